"""Tests of every stage, on CPU, in a few minutes:  python -m pytest -q test_all.py"""
import dataclasses
import errno
import glob
import json
import math
import os
import shutil
import subprocess
import sys
import time
import types

import cma
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import collect
import controller
import danger
import evaluate
import mdnrnn
import vae
from collect import CollectConfig
from controller import CConfig
from mdnrnn import MDNConfig
from vae import VAEConfig

HERE = os.path.dirname(os.path.abspath(__file__))
torch.set_num_threads(2)


def collect_quiet(out, **kw):
    return collect.collect(CollectConfig(out=str(out), **{"episodes": 12, "num_envs": 4, **kw}))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A whole (badly trained) V, M and C in a run dir, made in well under a minute."""
    run = tmp_path_factory.mktemp("run")
    collect_quiet(run / "data", episodes=24, num_envs=8)
    vae.train(VAEConfig(data=str(run / "data"), out=str(run / "vae.pt"), z_dim=8, spatial=False, epochs=1, batch_size=64))
    mdnrnn.train(MDNConfig(data=str(run / "data"), vae=str(run / "vae.pt"), out=str(run / "mdnrnn.pt"),
                           hidden=16, gaussians=2, epochs=1, hop_steps=1024))
    controller.train(CConfig(vae=str(run / "vae.pt"), mdnrnn=str(run / "mdnrnn.pt"), out=str(run / "controller.pt"),
                             inputs="zh", generations=1, popsize=4, levels=2, eval_every=1, eval_levels=2, workers=1))
    return run


def run_cli(*args):
    return subprocess.run([sys.executable, *args], cwd=HERE, capture_output=True, text=True, timeout=600)


# ---------------------------------------------------------------- collect.py

def test_collected_episodes_are_consistent(tmp_path):
    stats = collect_quiet(tmp_path)
    files = sorted(glob.glob(str(tmp_path / "episode_*.npz")))
    assert len(files) == 12 and stats["episodes"] == 12
    total = 0
    for f in files:
        ep = collect.load_episode(f)
        T = len(ep["action"])
        total += T
        assert ep["obs"].shape == (T, 64, 64, 3) and ep["obs"].dtype == np.uint8
        assert ep["done"][-1] and not ep["done"][:-1].any()  # done exactly at the end
        assert set(np.unique(ep["action"])) <= set(range(5))
        assert set(np.unique(ep["reward"])) <= {0.0, 10.0} and not ep["reward"][:-1].any()  # reward only at the end
        assert T <= collect.MAX_STEPS
        # consecutive frames of one episode differ little; the next level's first frame would not be here
    assert total == stats["frames"]


def test_same_seed_same_episodes_and_resume_keeps_files(tmp_path):
    collect_quiet(tmp_path / "a", seed=3)
    collect_quiet(tmp_path / "b", seed=3, episodes=6)
    first = tmp_path / "b" / "episode_000002.npz"
    mtime = os.path.getmtime(first)
    os.remove(tmp_path / "b" / "episode_000004.npz")
    again = collect_quiet(tmp_path / "b", seed=3)  # resume: fills 4 and 6..11, never rewrites the others
    assert again["episodes"] == 7 and os.path.getmtime(first) == mtime
    for fa in sorted(glob.glob(str(tmp_path / "a" / "*.npz"))):
        a, b = collect.load_episode(fa), collect.load_episode(str(tmp_path / "b" / os.path.basename(fa)))
        for k in a:
            assert np.array_equal(a[k], b[k]), (fa, k)
    c = collect_quiet(tmp_path / "c", seed=4, episodes=2)
    assert c["frames"] > 0
    assert not np.array_equal(collect.load_episode(str(tmp_path / "c" / "episode_000000.npz"))["obs"][0],
                              collect.load_episode(str(tmp_path / "a" / "episode_000000.npz"))["obs"][0])


def test_collect_matches_a_plain_loop(tmp_path):
    """collect's batched bookkeeping against the obvious loop: each env's frames, actions and
    rewards appended one by one, an episode closed when its env's `first` flag comes."""
    collect_quiet(tmp_path, episodes=8, num_envs=3, seed=5)
    env = collect.make_env(3, "easy", seed=5)
    act = collect.random_policy(np.random.default_rng(5), 3, CollectConfig.up_prob, CollectConfig.max_repeat)
    episodes, running = [], [dict(obs=[], action=[], reward=[]) for _ in range(3)]
    _, obs, _ = env.observe()
    while len(episodes) < 8:
        a = act()
        env.act(collect.ACTIONS[a])
        rew, next_obs, first = env.observe()
        for i in range(3):
            for k, v in (("obs", obs["rgb"][i]), ("action", a[i]), ("reward", rew[i])):
                running[i][k].append(v)
            if first[i]:
                episodes.append(running[i])
                running[i] = dict(obs=[], action=[], reward=[])
        obs = next_obs
    for n, want in enumerate(episodes[:8]):
        got = collect.load_episode(collect.episode_path(str(tmp_path), n))
        for k in ("obs", "action", "reward"):
            assert np.array_equal(got[k], np.stack(want[k])), (n, k)


def test_biased_policy_prefers_up():
    act = collect.random_policy(np.random.default_rng(0), 1000, up_prob=0.6, max_repeat=1)
    a = np.concatenate([act() for _ in range(20)])
    assert abs((a == collect.UP).mean() - 0.6) < 0.02
    assert collect.ACTIONS[collect.UP] == 5 and collect.ACTION_NAMES[collect.UP] == "UP"


@pytest.mark.parametrize("bad", ["truncated", "empty_dir", "no_dir"])
def test_bad_data_gives_one_clear_error(tmp_path, bad, tiny_run):
    data = tmp_path / "data"
    if bad != "no_dir":
        data.mkdir()
    if bad == "truncated":
        collect_quiet(tmp_path / "good", episodes=1, num_envs=1)
        blob = (tmp_path / "good" / "episode_000000.npz").read_bytes()
        (data / "episode_000000.npz").write_bytes(blob[: len(blob) // 2])
    for cmd in (["vae.py", "--data", str(data), "--out", str(tmp_path / "v.pt")],
                ["mdnrnn.py", "--data", str(data), "--vae", str(tiny_run / "vae.pt"), "--out", str(tmp_path / "m.pt")]):
        r = run_cli(*cmd)
        assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
        err = r.stderr.strip().splitlines()[-1]
        assert err.startswith("error:") and ("episode_000000.npz" in err if bad == "truncated" else str(data) in err), err


# ---------------------------------------------------------------- vae.py

def test_vae_shapes_and_range():
    m = vae.ConvVAE(16)
    x = torch.rand(5, 3, 64, 64)
    recon, mu, logvar = m(x)
    assert recon.shape == (5, 3, 64, 64) and mu.shape == logvar.shape == (5, 16)
    assert 0 <= recon.min() and recon.max() <= 1
    mu2, _ = vae.encode(m.eval(), np.zeros((3, 64, 64, 3), np.uint8), batch_size=2)
    assert mu2.shape == (3, 16)


def test_spatial_vae_shapes_and_locality():
    m = vae.ConvVAE(128, spatial=True).eval()
    x = torch.rand(2, 3, 64, 64)
    recon, mu, logvar = m(x)
    assert recon.shape == x.shape and mu.shape == logvar.shape == (2, 128)
    y = x.clone()
    y[:, :, :8, :8] = 0  # change one 8x8 patch: cells far from it keep their code
    d = (m.encode(y)[0] - m.encode(x)[0]).abs().view(2, 2, 8, 8)  # (B,c,8,8)
    assert d[:, :, :2, :2].sum() > 0 and d[:, :, 4:, 4:].sum() == 0
    with pytest.raises(ValueError, match="multiple of 64"):
        vae.ConvVAE(100, spatial=True)


def test_kl_matches_torch_distributions():
    mu, logvar = torch.randn(7, 5), torch.randn(7, 5)
    q = torch.distributions.Normal(mu, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros(5), torch.ones(5))
    x = torch.rand(7, 3, 64, 64)
    kl = vae.vae_loss(x, x, mu, logvar, torch.ones(7, 1, 64, 64), beta=1.0, kl_tolerance=0.0)[2]  # batch mean of sums
    assert torch.allclose(kl, torch.distributions.kl_divergence(q, p).sum(1).mean(), atol=1e-5)


def test_vae_loss_is_summed_per_frame_and_averaged_over_batch():
    x, r = torch.rand(4, 3, 64, 64), torch.rand(4, 3, 64, 64)
    mu, logvar, w = torch.randn(4, 6), torch.randn(4, 6), torch.ones(4, 1, 64, 64)
    loss, rec, kl = vae.vae_loss(x, r, mu, logvar, w, beta=1.0, kl_tolerance=0.0)
    brute = sum(((x[i] - r[i]) ** 2).sum() for i in range(4)) / 4
    assert torch.isclose(rec, brute, rtol=1e-5) and torch.isclose(loss, rec + kl, rtol=1e-5)
    w2 = w.clone()
    w2[:, :, :10] = 3.0  # weighted pixels count three times
    _, rec2, _ = vae.vae_loss(x, r, mu, logvar, w2, 1.0, 0.0)
    assert torch.isclose(rec2, rec + 2 * ((x - r) ** 2)[:, :, :10].sum() / 4, rtol=1e-5)
    big = vae.vae_loss(x, r, mu * 0, logvar * 0, w, 1.0, kl_tolerance=0.5)[0]  # KL = 0 < floor of 3 nats
    assert torch.isclose(big, rec + 3.0, rtol=1e-5)


def test_pixel_weight_is_one_on_the_background_and_adds_fg_weight_per_foreground_unit():
    fg = np.zeros((2, 64, 64), np.uint8)
    fg[0, 3, 4], fg[1, 5, 6] = collect.FG_UNIT, 2 * collect.FG_UNIT  # a plain foreground pixel; one of a rare colour
    w = vae.pixel_weight(fg, 10.0, collect.FG_UNIT)
    assert w.shape == (2, 1, 64, 64) and w[0, 0, 3, 4] == 11 and w[1, 0, 5, 6] == 21
    assert w.sum() == 2 * 64 * 64 + 10 + 20  # every other pixel weighs 1


def test_tiny_vae_overfits_a_few_frames(tmp_path):
    collect_quiet(tmp_path, episodes=1, num_envs=1)
    frames = collect.load_episode(str(tmp_path / "episode_000000.npz"))["obs"][:8]
    torch.manual_seed(0)
    m = vae.ConvVAE(8)
    opt = torch.optim.Adam(m.parameters(), lr=2e-3)
    x, w = vae.to_input(frames), torch.ones(len(frames), 1, 64, 64)
    losses = []
    for _ in range(150):
        loss = vae.vae_loss(x, *m(x), w, beta=0.1, kl_tolerance=0.5)[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0], (losses[0], losses[-1])


def test_vae_checkpoint_roundtrip_resume_and_no_overwrite(tiny_run):
    m = vae.load_vae(str(tiny_run / "vae.pt"))
    ckpt = torch.load(tiny_run / "vae.pt", weights_only=True)
    assert ckpt["config"]["z_dim"] == 8 and ckpt["epoch"] == 1 and "optimizer" in ckpt
    again = vae.ConvVAE(8).eval()
    again.load_state_dict(ckpt["model"])
    x = torch.rand(3, 3, 64, 64)
    # load_vae keeps the conv weights channels-last (faster on CPU): the same numbers up to float rounding
    assert torch.allclose(m.decode(m.encode(x)[0]), again.decode(again.encode(x)[0]), atol=1e-5)
    assert os.path.exists(tiny_run / "vae.png") and os.path.exists(tiny_run / "vae.jsonl")
    r = run_cli("vae.py", "--data", str(tiny_run / "data"), "--out", str(tiny_run / "vae.pt"))
    assert r.returncode != 0 and "exists" in r.stderr and torch.load(tiny_run / "vae.pt", weights_only=True)["epoch"] == 1


def test_vae_resume_continues_training(tmp_path):
    collect_quiet(tmp_path / "d", episodes=4, num_envs=4)
    cfg = VAEConfig(data=str(tmp_path / "d"), out=str(tmp_path / "v.pt"), z_dim=4, spatial=False, epochs=1, batch_size=64, holdout=0)
    vae.train(cfg)
    vae.train(VAEConfig(**{**cfg.__dict__, "epochs": 2, "resume": True}))
    ckpt = torch.load(tmp_path / "v.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["step"] == 2 * math.ceil(ckpt["step"] / 2)
    assert len(open(tmp_path / "v.jsonl").read().splitlines()) == 2


def test_vae_init_starts_from_another_v(tmp_path):
    """--init (train.py's later rounds): V starts at the given V's weights (a tiny lr keeps them), records its id,
    and a V of another shape gets one error line before anything is written."""
    collect_quiet(tmp_path / "d", episodes=4, num_envs=4)
    cfg = VAEConfig(data=str(tmp_path / "d"), out=str(tmp_path / "a.pt"), z_dim=4, spatial=False, epochs=1, batch_size=64, holdout=0)
    vae.train(cfg)
    tuned = vae.train(VAEConfig(**{**cfg.__dict__, "out": str(tmp_path / "b.pt"), "init": cfg.out, "lr": 1e-12, "seed": 1}))
    scratch = vae.train(VAEConfig(**{**cfg.__dict__, "out": str(tmp_path / "c.pt"), "lr": 1e-12, "seed": 1}))
    start = vae.load_vae(cfg.out).state_dict()
    assert all(torch.allclose(v, start[k], atol=1e-6) for k, v in tuned.state_dict().items())
    assert not all(torch.allclose(v, start[k], atol=1e-6) for k, v in scratch.state_dict().items())
    assert torch.load(tmp_path / "b.pt", weights_only=True)["made_from"]["init"] == vae.load_checkpoint(cfg.out)["id"]
    with pytest.raises(SystemExit) as e:
        vae.train(VAEConfig(**{**cfg.__dict__, "out": str(tmp_path / "d.pt"), "init": cfg.out, "z_dim": 8}))
    assert str(e.value).startswith(f"error: --init {cfg.out}: ") and not os.path.exists(tmp_path / "d.pt")


# ---------------------------------------------------------------- mdnrnn.py

def m_with_heads(win_p, death_p, z_dim=4, hidden=8):
    """A tiny M whose win and death heads give fixed probabilities (their weights zeroed, biases set)."""
    m = mdnrnn.MDNRNN(z_dim, hidden, 2).eval()
    with torch.no_grad():
        m.head.weight[-2:] = 0
        m.head.bias[-2:] = torch.tensor([win_p, death_p]).logit()
    return m


def test_dream_shapes_probabilities_and_cap():
    torch.manual_seed(0)
    up = lambda z, h, idx: torch.full((len(z),), collect.UP)  # noqa: E731 -- a policy: always UP
    ret, length = mdnrnn.dream(m_with_heads(1e-9, 1e-9), up, torch.zeros(5, 4), max_steps=500)
    assert ret.shape == (5,) and length.tolist() == [500] * 5 and ret.sum() == 0  # the game's cap ends them
    ret, length = mdnrnn.dream(m_with_heads(1 - 1e-6, 1e-9), up, torch.zeros(5, 4))
    assert ret.tolist() == [10.0] * 5 and length.tolist() == [1] * 5  # a sampled win pays 10 and ends it
    ret, length = mdnrnn.dream(m_with_heads(1e-9, 0.1), up, torch.zeros(4000, 4), max_steps=500)
    assert abs(length.float().mean().item() - 10) < 0.6 and ret.sum() == 0  # death ~ Bernoulli(0.1): mean 10


def test_dream_at_tau_near_zero_is_deterministic():
    """Same seed, same dream; tau -> 0: M's mixture collapses to its likeliest component's mean, so the dream
    no longer depends on the seed."""
    m = m_with_heads(1e-9, 1e-9)
    def path(seed, tau):
        torch.manual_seed(seed)
        seen = []
        mdnrnn.dream(m, lambda z, h, idx: seen.append(z.clone()) or torch.zeros(len(z), dtype=torch.long),
                     torch.randn(3, 4, generator=torch.Generator().manual_seed(9)), tau=tau, max_steps=20)
        return torch.stack(seen)  # (20,3,4)
    assert torch.equal(path(0, 1e-8), path(0, 1e-8)) and torch.equal(path(0, 1.0), path(0, 1.0))  # same seed
    assert torch.allclose(path(0, 1e-8), path(1, 1e-8), atol=1e-3)  # noise scaled by sqrt(tau): ~1e-4 of sigma
    assert not torch.allclose(path(0, 1.0), path(1, 1.0), atol=0.1)


def test_c_trained_in_a_dream_raises_its_dream_return():
    """A tiny M learns that UP wins (synthetic data); CMA-ES on C's weights with the dream as its only
    environment (ask -> dream -> tell) finds it: the dream return rises from 0 to near 10."""
    torch.manual_seed(0)
    m = mdnrnn.MDNRNN(4, 8, 2)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    for _ in range(300):
        action = torch.randint(0, 5, (64, 8))
        win = (action == collect.UP).float()
        batch = dict(mu=torch.randn(64, 9, 4), logvar=torch.full((64, 9, 4), -4.0), action=action, win=win,
                     death=torch.zeros(64, 8), step_mask=torch.ones(64, 8), next_mask=torch.ones(64, 8))
        nll, win_bce, death_bce, _ = mdnrnn.m_losses(m, batch)
        opt.zero_grad()
        (nll + win_bce + death_bce).backward()
        opt.step()
    m.eval()
    z0 = torch.randn(64, 4)

    def dream_return(X):  # (P,n) candidates -> their mean dream return over the 64 starts
        W = torch.as_tensor(X, dtype=torch.float32).view(len(X), 5, -1).repeat_interleave(len(z0), 0)  # (P*64,5,13)
        policy = lambda z, h, idx: controller.choose(W[idx], controller.features(z, h, "zh"))  # noqa: E731
        ret, _ = mdnrnn.dream(m, policy, z0.repeat(len(X), 1), max_steps=5)
        return ret.view(len(X), -1).mean(1).numpy(), None
    es = cma.CMAEvolutionStrategy(np.zeros(5 * 13), 0.5, dict(popsize=8, seed=1, verbose=-9))
    start = dream_return(es.mean[None])[0][0]
    for _ in range(15):
        controller.cma_generation(es, dream_return)
    end = dream_return(es.mean[None])[0][0]
    assert start < 6 and end > 8 and end > start + 3  # from always-LEFT (ties: argmax 0) to UP


def test_mdn_nll_matches_torch_distributions():
    B, T, Z, K = 3, 4, 5, 6
    logit_pi, mu, log_sigma, target = torch.randn(B, T, Z, K), torch.randn(B, T, Z, K), torch.randn(B, T, Z, K) * 0.5, torch.randn(B, T, Z)
    mix = torch.distributions.MixtureSameFamily(torch.distributions.Categorical(logits=logit_pi),
                                                torch.distributions.Normal(mu, log_sigma.exp()))
    reference = -torch.distributions.Independent(mix, 1).log_prob(target)  # (B,T): summed over Z
    assert torch.allclose(mdnrnn.mdn_nll(logit_pi, mu, log_sigma, target), reference, atol=1e-4)


def synthetic_batch(B=16, L=10, Z=3, pad=0, seed=0):
    """Sequences where z_{t+1} = 0.9 roll(z_t) + an action-dependent shift, death when action == 4, win
    when action == 3, in m_losses' batch layout; `pad` extra masked steps at the end."""
    g = torch.Generator().manual_seed(seed)
    action = torch.randint(0, 5, (B, L + pad), generator=g)
    z = [torch.randn(B, Z, generator=g)]
    for t in range(L + pad):
        z.append(0.9 * z[-1].roll(1, -1) + 0.3 * (action[:, t:t + 1] - 2).float())
    mu = torch.stack(z, 1)  # (B,L+pad+1,Z)
    step = (torch.arange(L + pad) < L).float().expand(B, -1).clone()
    return dict(mu=mu, logvar=torch.full_like(mu, -20.0), action=action, win=(action == 3).float(),
                death=(action == 4).float(), step_mask=step, next_mask=step.clone())


def test_padding_does_not_change_the_loss():
    torch.manual_seed(0)
    m = mdnrnn.MDNRNN(3, 16, 2)
    a = synthetic_batch()
    b = synthetic_batch(pad=5)  # 5 extra steps, masked out
    for k in a:
        b[k][:, :a[k].shape[1]] = a[k]  # the same real steps as a
    b["mu"][:, 11:] = 99.0  # garbage in the padded frames must not matter
    b["action"][:, 10:] = 4
    la = [x.item() for x in mdnrnn.m_losses(m, a, sample=False)[:3]]
    lb = [x.item() for x in mdnrnn.m_losses(m, b, sample=False)[:3]]
    assert np.allclose(la, lb, rtol=1e-5), (la, lb)


def test_tiny_m_learns_dynamics_and_heads():
    torch.manual_seed(0)
    m = mdnrnn.MDNRNN(3, 32, 2)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    batch = synthetic_batch(B=64)
    start = [x.item() for x in mdnrnn.m_losses(m, batch)[:3]]
    for _ in range(300):
        nll, r, d, _ = mdnrnn.m_losses(m, batch)
        opt.zero_grad()
        (nll + r + d).backward()
        opt.step()
    nll, r, d, d_logit = mdnrnn.m_losses(m, synthetic_batch(B=64, seed=1), sample=False)  # new sequences
    assert nll.item() < start[0] - 8 and nll.item() < 0  # sharp density: a negative NLL is normal
    assert r.item() < 0.3 and d.item() < 0.3, (r.item(), d.item())  # from ~0.69 = a coin flip
    assert ((d_logit > 0).float() == synthetic_batch(B=64, seed=1)["death"]).float().mean() > 0.9  # base rate 0.8
    # the mean of the most likely component predicts z_{t+1}
    test = synthetic_batch(B=8, seed=2)
    (logit_pi, mu, _), _, _, _ = m(test["mu"][:, :-1], test["action"])
    best = mu.gather(-1, logit_pi.argmax(-1, keepdim=True)).squeeze(-1)  # (B,L,Z)
    err = (best - test["mu"][:, 1:]).abs().mean()
    assert err < 0.1 and err < 0.2 * (test["mu"][:, :-1] - test["mu"][:, 1:]).abs().mean()  # far better than "z stays"


def test_tau_to_zero_samples_the_most_likely_mean():
    logit_pi, mu, log_sigma = torch.randn(4, 1, 3, 5), torch.randn(4, 1, 3, 5), torch.zeros(4, 1, 3, 5)
    z, win, death = mdnrnn.sample_next(logit_pi, mu, log_sigma, torch.zeros(4, 1), torch.full((4, 1), -50.0), tau=1e-8)
    expected = mu.gather(-1, logit_pi.argmax(-1, keepdim=True)).squeeze(-1)[:, 0]  # (4,3)
    assert torch.allclose(z, expected, atol=1e-3) and not death.any()
    z1 = mdnrnn.sample_next(logit_pi, mu, log_sigma, torch.zeros(4, 1), torch.zeros(4, 1), tau=1.0)[0]
    assert z1.shape == (4, 3) and not torch.allclose(z1, expected, atol=1e-3)


def test_sampled_components_follow_the_tempered_mixture():
    """sample_next draws each dim's component with probability softmax(logits / tau), as a Categorical would."""
    torch.manual_seed(0)
    logits = torch.tensor([0.5, -1.0, 2.0, 0.0, 1.0])
    mu = torch.arange(5.0).expand(4000, 1, 8, 5)  # component k's mean is k, its sigma ~0: z tells the component
    for tau in (1.0, 0.5):
        z = mdnrnn.sample_next(logits.expand(4000, 1, 8, 5), mu, torch.full_like(mu, -12.0), torch.zeros(4000, 1),
                               torch.zeros(4000, 1), tau)[0].round().long()  # (4000,8)
        freq = torch.bincount(z.flatten(), minlength=5).float() / z.numel()
        assert torch.allclose(freq, torch.softmax(logits / tau, 0), atol=0.01)  # 32,000 draws: std < 0.003


def test_stepping_equals_the_whole_sequence():
    torch.manual_seed(0)
    m = mdnrnn.MDNRNN(4, 8, 3).eval()
    z, a = torch.randn(2, 6, 4), torch.randint(0, 5, (2, 6))
    whole, _, _, (h, c) = m(z, a)
    state = None
    for t in range(6):
        one, _, _, state = m.step(z[:, t], a[:, t], state)
        assert torch.allclose(one[1][:, 0], whole[1][:, t], atol=1e-6)
        assert torch.equal(m.advance(z[:, t], a[:, t], None if t == 0 else prev)[0], state[0]) if t else True
        prev = state
    assert torch.allclose(state[0], h, atol=1e-6) and torch.allclose(state[1], c, atol=1e-6)


def test_m_trains_on_encoded_episodes(tiny_run):
    ckpt = torch.load(tiny_run / "mdnrnn.pt", weights_only=True)
    assert ckpt["z_dim"] == 8 and ckpt["config"]["hidden"] == 16 and ckpt["epoch"] == 1
    lat = sorted(glob.glob(str(tiny_run / "latents" / "*.npz")))
    assert len(lat) == 24
    with np.load(lat[0]) as d:
        ep = collect.load_episode(str(tiny_run / "data" / os.path.basename(lat[0])))
        assert d["mu"].shape == (len(ep["action"]), 8) and np.array_equal(d["action"], ep["action"])
    data, held = mdnrnn.load_sequences(str(tiny_run / "latents"), 32, 20)
    assert data["step_mask"].sum() == sum(len(np.load(f)["action"]) for f in lat)  # every step once
    assert ckpt["hop_env_steps"] == 1024 == danger.hop_env_steps(1024) and not ckpt["grid"]  # V is flat: an MLP
    row = evaluate.read_jsonl(str(tiny_run / "mdnrnn.jsonl"))[-1]
    assert row["hop_bce"] > 0 and (np.isnan(row["test_hop_auc"]) or 0 <= row["test_hop_auc"] <= 1)
    assert mdnrnn.load_mdnrnn(str(tiny_run / "mdnrnn.pt")).hop is not None


def test_c_on_m_hop_danger_trains_and_plays_without_d(tiny_run, tmp_path, one_torch_thread):
    """--inputs zhm --mirror: C trains on M's hop head read twice (the frame and its mirror), the checkpoint keeps the
    flag, and the agent evaluate.py loads plays the held-out levels exactly as the training rollouts do."""
    r = copy_run(tiny_run, tmp_path, "vae.pt", "mdnrnn.pt")
    controller.train(CConfig(vae=str(r / "vae.pt"), mdnrnn=str(r / "mdnrnn.pt"), out=str(r / "controller.pt"), mirror=True,
                             inputs="zhm", generations=1, popsize=4, levels=2, eval_every=1, eval_levels=2, workers=1))
    agent = evaluate.load_agent(str(r))  # no danger.pt: C reads M's hop head
    assert agent.inputs == "zhm" and agent.danger is None and not os.path.exists(r / "danger.pt") and agent.mirror
    returns, lengths = evaluate.play(agent, 8, TEST_SEED, "easy")
    assert returns.shape == (8,) and lengths.min() >= 1
    levels = [info["level_seed"] for info in collect.make_env(8, "easy", seed=TEST_SEED).get_info()]
    trained, _ = controller.rollout(agent.vae, agent.mdn, agent.weights.reshape(1, -1).numpy(), levels, "easy", "zhm",
                                    mirror=True)
    assert np.array_equal(returns, trained[0])
    for flags in (dict(inputs="zh", mirror=True), dict(inputs="zhd", mirror=True)):  # the mirror is M's hop head's
        with pytest.raises(SystemExit) as e:
            CConfig(**flags)
        assert "--mirror with --inputs" in str(e.value)
    import train
    with pytest.raises(SystemExit) as e:
        train.TrainConfig(inputs="zhd", mirror=True)
    assert "--mirror with --inputs zhd" in str(e.value)


def test_c_reads_m_hop_danger_of_an_up(tiny_run):
    """--inputs zhm: C's last input is M's hop head on (z, the last frame's z, UP); from D's start point C plays
    "UP iff that logit < 0, else no-op". Checked against the hop head called by hand, two steps of 8 envs."""
    v, m = vae.load_vae(str(tiny_run / "vae.pt")), mdnrnn.load_mdnrnn(str(tiny_run / "mdnrnn.pt"))
    x0 = torch.tensor(danger.start_point(5 * (n_features("zhm", 8, 16) + 1), "zhm", 1.0), dtype=torch.float32)
    agent, env = controller.Agent(v, m, x0, "zhm"), collect.make_env(8, "easy", seed=3)
    _, obs, first = env.observe()
    with torch.no_grad():  # logits of both signs around the first frames (the tiny head's may share one sign)
        z = v.encode(vae.to_input(obs["rgb"]))[0]
        m.hop.net[-1].bias -= m.hop(z, z, torch.full((8,), collect.UP)).median() + 1e-4
    z_last = None
    for _ in range(2):
        z = v.encode(vae.to_input(obs["rgb"]))[0]
        z_last = z if z_last is None else torch.where(torch.from_numpy(first)[:, None], z, z_last)
        with torch.no_grad():
            logit = m.hop(z, z_last, torch.full((8,), collect.UP))
        actions = agent.act(obs["rgb"], first)
        assert np.array_equal(actions, collect.ACTIONS[np.where(logit.numpy() < 0, collect.UP, collect.NONE)])
        env.act(actions)
        _, obs, first = env.observe()
        z_last = z
    mirrored, env, z_last = controller.Agent(v, m, x0, "zhm", mirror=True), collect.make_env(8, "easy", seed=3), None
    _, obs, first = env.observe()  # --mirror: the logit averaged with the mirror image's (whose UP is UP), three steps
    for _ in range(3):
        x = vae.to_input(obs["rgb"])
        with torch.no_grad():
            z = v.encode(torch.cat([x, x.flip(-1)]))[0].view(2, 8, -1)  # (2,8,Z): as seen, mirrored
            z_last = z if z_last is None else torch.where(torch.from_numpy(first)[:, None], z, z_last)
            logit = (m.hop(z[0], z_last[0], torch.full((8,), collect.UP)) + m.hop(z[1], z_last[1], torch.full(
                (8,), collect.UP))) / 2
        actions = mirrored.act(obs["rgb"], first)
        assert np.array_equal(actions, collect.ACTIONS[np.where(logit.numpy() < 0, collect.UP, collect.NONE)])
        env.act(actions)
        _, obs, first = env.observe()
        z_last = z


def test_death_labels_exclude_wins_and_the_cap(tmp_path):
    """M's death target is procgen's done minus the win and the 500-step cap (both also end an episode)."""
    def episode(name, T, won):
        reward, done = np.zeros(T, np.float32), np.zeros(T, bool)
        reward[-1], done[-1] = 10.0 * won, True
        np.savez(tmp_path / name, mu=np.zeros((T, 2), np.float16), logvar=np.zeros((T, 2), np.float16),
                 action=np.zeros(T, np.int8), reward=reward, done=done)
    episode("a_death.npz", 7, False)
    episode("b_win.npz", 9, True)
    episode("c_cap.npz", collect.MAX_STEPS, False)
    data, _ = mdnrnn.load_sequences(str(tmp_path), 8, 0)
    assert data["death"].sum() == 1 and data["death"][0, 6] == 1  # only the first episode's last step
    assert data["win"].sum() == 1 and data["win"][2, 0] == 1  # b's step 8: its second window (the third row)


def test_masked_bce_is_torch_bce_over_the_mask():
    logit, target, mask = torch.randn(4, 6), (torch.rand(4, 6) < 0.2).float(), (torch.rand(4, 6) < 0.8).float()
    ref = F.binary_cross_entropy_with_logits(logit, target, reduction="none")
    assert torch.allclose(mdnrnn.masked_bce(logit, target, mask), (ref * mask).sum() / mask.sum())


def test_hop_head_learns_which_move_kills():
    """Synthetic hop-then-wait moves on V's 8x8 grid: a move kills exactly when it is UP and something moved into
    the frog's row (row 7 of channel 0 grew since the last frame): a rule the mirror keeps. M's hop head learns it
    through hop_epoch (which mirrors half the moves) and ranks held-out UPs (hop_auc) almost perfectly."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    z, z_last, a = torch.randn(3000, 2, 8, 8, generator=g), torch.randn(3000, 2, 8, 8, generator=g), \
        torch.randint(0, 5, (3000,), generator=g)
    died = ((a == collect.UP) & ((z - z_last)[:, 0, 7].sum(-1) > 0)).float()  # (N,)
    hop = dict(z=z.flatten(1), z_last=z_last.flatten(1), z_mirror=z.flip(-1).flatten(1),
               z_last_mirror=z_last.flip(-1).flatten(1), action=a, died=died)  # (N,128) x4, (N,) x2
    m = mdnrnn.MDNRNN(128, 16, 2, hop=danger.HopHead(128, grid=True))
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    lstm_before = m.lstm.weight_ih_l0.clone()
    for epoch in range(8):
        bce = danger.hop_epoch(m, opt, hop, torch.arange(2500), np.random.default_rng(epoch), 64, "cpu")
    assert bce < 0.3 and danger.hop_auc(m, hop, torch.arange(2500, 3000)) > 0.95
    assert torch.equal(m.lstm.weight_ih_l0, lstm_before)  # the hop head learns alone: M's LSTM is untouched
    assert np.isnan(danger.hop_auc(m, hop, torch.arange(0)))


# ---------------------------------------------------------------- controller.py

def n_features(inputs, z_dim=8, hidden=16):
    return sum(controller.input_sizes(inputs, z_dim, hidden).values())


def up_params(D):
    w = np.zeros((5, D + 1))
    w[collect.UP, -1] = 1.0  # only the bias of UP: always UP
    return w.ravel()


def test_always_up_controller_matches_the_baseline(tiny_run):
    v, m = vae.load_vae(str(tiny_run / "vae.pt")), mdnrnn.load_mdnrnn(str(tiny_run / "mdnrnn.pt"))
    D = n_features("zh")
    returns, steps = controller.rollout(v, m, up_params(D)[None], controller.level_draw(7, 0, 400), "easy", "zh")
    win = (returns == 10).mean()
    assert returns.shape == (1, 400) and steps > 400
    assert 0.25 < win < 0.41, win  # always-UP wins 32.8% of easy levels (2000 episodes)


def test_danger_prior_starts_at_up_unless_d_says_deadly():
    D = n_features("zhd")
    x0 = danger.start_point(5 * (D + 1), "zhd", danger_prior=1.0)
    f = torch.randn(500, D) * 3  # (n,D): z, h and d = the last column, of any sign
    a = controller.choose(torch.as_tensor(x0, dtype=torch.float32), f).numpy()
    assert np.array_equal(a, np.where(f[:, -1].numpy() < 0, collect.UP, collect.NONE))
    assert not danger.start_point(5 * (D + 1), "zhd").any()  # no prior: CMA-ES starts at zero
    x1 = danger.start_point(5 * (D + 1), "zhm", danger_prior=2.0, threshold=-1.5)  # "UP iff M's logit < -1.5"
    a = controller.choose(torch.as_tensor(x1, dtype=torch.float32), f).numpy()
    assert np.array_equal(a, np.where(f[:, -1].numpy() < -1.5, collect.UP, collect.NONE))


def test_pool_equals_serial(tiny_run):
    v, m = str(tiny_run / "vae.pt"), str(tiny_run / "mdnrnn.pt")
    X = np.random.default_rng(0).normal(0, 0.5, (4, 5 * (n_features("zh") + 1)))
    levels = controller.level_draw(1, 0, 6)
    controller.init_worker(v, m)
    serial, s1 = controller.fitness(None, X, levels, "easy", "zh", workers=2)
    torch.set_num_threads(2)
    with controller.make_pool("process", 2, v, m) as pool:
        pooled, s2 = controller.fitness(pool, X, levels, "easy", "zh", workers=2)
    assert np.array_equal(serial, pooled) and s1 == s2


def test_ray_pool_equals_serial(tiny_run):
    """--pool ray: Ray's multiprocessing Pool (a local instance here) gives the serial fitness exactly."""
    ray = pytest.importorskip("ray")
    v, m = str(tiny_run / "vae.pt"), str(tiny_run / "mdnrnn.pt")
    X = np.random.default_rng(0).normal(0, 0.5, (3, 5 * (n_features("zh") + 1)))
    levels = controller.level_draw(2, 0, 4)
    controller.init_worker(v, m)
    serial, s1 = controller.fitness(None, X, levels, "easy", "zh", workers=2)
    pool = controller.make_pool("ray", 2, v, m)
    try:
        pooled, s2 = controller.fitness(pool, X, levels, "easy", "zh", workers=2)
    finally:
        pool.terminate()
        ray.shutdown()
    assert np.array_equal(serial, pooled) and s1 == s2


def test_ray_pool_without_ray_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray.util.multiprocessing", None)  # an import of it now fails
    with pytest.raises(SystemExit) as e:
        controller.make_pool("ray", 2, "v.pt", "m.pt")
    assert str(e.value) == "error: --pool ray needs Ray, which is not installed: pip install ray"


def test_start_point_is_a_candidate(tiny_run, tmp_path, monkeypatch):
    """C's start point is validated like any candidate and kept when no candidate beats it (here a fake fitness
    ranks every point by its distance to the start, so nothing can)."""
    start = danger.start_point(5 * (n_features("zh") + 1), "zh").ravel()

    def fake_fitness(pool, X, levels, *task):
        return -np.abs(X - start).sum(1), len(levels)
    monkeypatch.setattr(controller, "fitness", fake_fitness)
    out = tmp_path / "c.pt"
    controller.train(CConfig(vae=str(tiny_run / "vae.pt"), mdnrnn=str(tiny_run / "mdnrnn.pt"), out=str(out),
                             inputs="zh", generations=2, popsize=4, levels=2, eval_every=1, eval_levels=3, workers=1))
    ckpt = torch.load(out, weights_only=True)
    assert np.array_equal(ckpt["params"].numpy(), start) and ckpt["best_score"] == 0.0
    assert ckpt["env_steps"] == 3 + 2 * (2 + 3)  # the start's validation (3 levels) counts, then 2 x (2 + 3)


def test_frames_come_back_from_the_store(tmp_path):
    """V's frames live in a file, read back by index: the same frames and masks as the episodes, in order."""
    collect_quiet(tmp_path / "data", episodes=6)
    obs = np.concatenate([collect.load_episode(p)["obs"] for p in collect.list_episodes(str(tmp_path / "data"))])
    with open(tmp_path / "store", "w+b") as store:
        rows, held, fg = collect.load_frames(str(tmp_path / "data"), 3, 24, store)
        assert os.path.getsize(tmp_path / "store") == len(obs) * collect.ROW == len(held) * collect.ROW
        idx = np.random.default_rng(0).permutation(len(obs))[:50]
        frames, masks = rows(idx)
    assert np.array_equal(frames, obs[idx]) and masks.shape == (50, 64, 64) and set(np.unique(masks)) <= {0, collect.FG_UNIT}
    assert 0 < fg < 0.5 and 0 < held.mean() < 0.6  # every 3rd episode held out


def test_colour_weights_give_a_small_sprite_the_weight_of_a_large_one(tmp_path):
    """--colour-balance: a frame's foreground weight is spread so that each colour weighs the same in all: a 3x3
    sprite (hard mode's frog) as much as a 10x10 block, 11 times as much per pixel; nothing off the foreground."""
    obs = np.full((2, 64, 64, 3), 40, np.uint8)  # (T,64,64,3) a dark background
    obs[:, 10:20, 10:20] = (200, 60, 60)  # a 10x10 red block (a log)
    obs[0, 40:43, 30:33] = (150, 220, 40)  # a 3x3 green sprite (the frog), in frame 0 only
    mask = (obs != 40).any(axis=3)  # (T,64,64)
    w = collect.colour_weights(obs, mask).astype(float)
    assert w[~mask].sum() == 0 and abs(w[0][mask[0]].mean() - 4) <= 0.5 and np.all(w[1][mask[1]] == 4)
    frog, log = w[0, 40:43, 30:33], w[0, 10:20, 10:20]  # equal in all, up to rounding each pixel to a quarter
    assert abs(frog.sum() - log.sum()) <= 0.5 * (9 + 100) and frog.min() > 10 * log.max()
    collect_quiet(tmp_path / "data", episodes=3)
    with open(tmp_path / "store", "w+b") as store:
        rows, held, _ = collect.load_frames(str(tmp_path / "data"), 0, 24, store, colour_balance=True)
        _, weights = rows(np.arange(len(held)))
    assert weights.max() > 4 and len(np.unique(weights)) > 2  # the real frames' colours: spread, not flat


def test_device_flag(tmp_path):
    for argv in (["--device", "gpu"], ["--device", "cuda"] if not torch.cuda.is_available() else None):
        if argv:
            r = subprocess.run([sys.executable, "vae.py", *argv, "--out", str(tmp_path / "v.pt")], cwd=HERE,
                               capture_output=True, text=True, timeout=120)
            assert r.returncode != 0 and "--device" in r.stderr.strip().splitlines()[-1] and "Traceback" not in r.stderr
            assert not os.listdir(tmp_path)
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    assert vae.pick_device("cpu") == "cpu" and vae.pick_device("auto") == auto


def test_controller_trained_in_the_dream(tiny_run, tmp_path):
    """--controller-env dream: fitness from M's dream (no env steps), the CMA mean and best re-tested in the real
    game every eval_every generations and logged beside their dream scores; only those real checks count."""
    out = tmp_path / "c.pt"
    controller.train(CConfig(vae=str(tiny_run / "vae.pt"), mdnrnn=str(tiny_run / "mdnrnn.pt"), out=str(out),
                             inputs="zh", controller_env="dream", dream_episodes=8, generations=2, popsize=4,
                             levels=2, eval_every=2, eval_levels=3, workers=1))
    rows = evaluate.read_jsonl(str(tmp_path / "c.jsonl"))
    assert [("dream_mean" in r, "val_mean" in r) for r in rows] == [(False, False), (True, True)]
    assert all(r["agent_steps_per_s"] > 0 for r in rows)
    real_checks = rows[-1]["env_steps"]  # the start's 3 validation levels, then 2 candidates x 3 levels
    assert 0 < real_checks <= (3 + 2 * 3) * 500 and torch.load(out, weights_only=True)["env_steps"] == real_checks
    for inputs in ("zhd", "zhm"):
        with pytest.raises(SystemExit) as e:
            CConfig(inputs=inputs, controller_env="dream")
        assert "the dream gives C only z and h" in str(e.value)


def test_train_dream_defaults():
    import train
    cfg = train.parse_args(["--controller-env", "dream"])
    assert (cfg.inputs, cfg.danger_steps, cfg.out) == ("zh", 0, os.path.join("runs", "easy-default-dream"))
    with pytest.raises(SystemExit):
        train.parse_args(["--controller-env", "dream", "--inputs", "zhd", "--danger-steps", "100"])


def test_train_no_d_preset_is_the_readme_command_and_flags_still_override():
    import train
    long = ["--inputs", "zhm", "--danger-steps", "0", "--z-dim", "256", "--colour-balance", "--vae-epochs", "7",
            "--hop-steps", "1600000", "--hop-convs", "3", "--hop-width", "64", "--mirror", "--start-threshold", "-1",
            "--generations", "5", "--out", "r"]
    preset = train.parse_args(["--preset", "no-d", "--out", "r"])
    assert dataclasses.replace(preset, preset="default") == train.parse_args(long)  # only the preset's name differs
    assert train.parse_args(["--preset", "no-d"]).out == os.path.join("runs", "easy-no-d")
    cfg = train.parse_args(["--preset", "no-d", "--generations", "2", "--colour-balance", "false"])
    assert (cfg.generations, cfg.colour_balance, cfg.z_dim) == (2, False, 256)  # a flag overrides one field, no more
    with pytest.raises(SystemExit):  # the preset gives C M's hop head: asking for D's input without D is refused
        train.parse_args(["--preset", "no-d", "--inputs", "zhd"])


def test_cma_loop_improves_a_toy_objective():
    target = np.linspace(-1, 1, 20)
    es = cma.CMAEvolutionStrategy(np.zeros(20), 0.5, dict(popsize=12, seed=1, verbose=-9))
    score = lambda X: (-((X - target) ** 2).sum(1), None)
    first = score(np.array(es.ask()))[0].mean()
    for _ in range(60):
        X, F, _ = controller.cma_generation(es, score)
    assert F.mean() > 0.1 * first and -score(es.mean[None])[0][0] < 0.05  # from ~-7 to close to 0


def test_controller_checkpoint_and_resume(tiny_run, tmp_path):
    ckpt = torch.load(tiny_run / "controller.pt", weights_only=True)
    assert ckpt["generation"] == 1 and ckpt["params"].shape == (5 * (8 + 16 + 1),) and ckpt["env_steps"] > 0
    out = tmp_path / "c.pt"
    base = dict(vae=str(tiny_run / "vae.pt"), mdnrnn=str(tiny_run / "mdnrnn.pt"), out=str(out), popsize=4,
                levels=2, eval_every=1, eval_levels=2, workers=1, inputs="zh")
    controller.train(CConfig(generations=1, **base))
    controller.train(CConfig(generations=2, resume=True, **base))
    resumed = torch.load(out, weights_only=True)
    straight = tmp_path / "s.pt"
    controller.train(CConfig(generations=2, **{**base, "out": str(straight)}))
    assert resumed["generation"] == 2 and resumed["env_steps"] == torch.load(straight, weights_only=True)["env_steps"]
    assert torch.equal(resumed["params"], torch.load(straight, weights_only=True)["params"])


# ---------------------------------------------------------------- evaluate.py

TEST_SEED = evaluate.EvalConfig.seed


@pytest.fixture
def one_torch_thread():
    """The tiny models here run ops of microseconds, where a second thread only adds sync cost: on a
    busy 2-core machine 2 threads made the agent's play 10x slower (74 s vs 6 s for 12 episodes)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_agent_actions_alive_and_first(tiny_run):
    agent = evaluate.load_agent(str(tiny_run))
    assert agent.distribution_mode == "easy"
    obs = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    agent.reset(3)
    a = agent.act(obs, np.ones(3, dtype=bool))
    assert a.shape == (3,) and np.issubdtype(a.dtype, np.integer) and set(a.tolist()) <= {1, 3, 4, 5, 7}
    # A finished env gets NONE (procgen id 4) and its memory is left alone.
    h1 = agent.state[0][:, 1].clone()
    a = agent.act(obs, np.zeros(3, dtype=bool), alive=np.array([True, False, True]))
    assert a[1] == collect.ACTIONS[collect.NONE] == 4 and torch.equal(agent.state[0][:, 1], h1)
    for _ in range(3):
        agent.act(obs, np.zeros(3, dtype=bool))
    # first[i] zeroes env i's (h, c) before acting: env 0 now matches a fresh agent, env 1 does not.
    fresh = evaluate.load_agent(str(tiny_run))
    fresh.reset(3)
    fresh.act(obs, np.ones(3, dtype=bool))
    agent.act(obs, np.array([True, False, False]))
    for k in (0, 1):
        assert torch.equal(agent.state[k][:, 0], fresh.state[k][:, 0])
    assert not torch.equal(agent.state[0][:, 1], fresh.state[0][:, 1])


def test_load_agent_names_missing_file(tiny_run, tmp_path):
    for name in ("vae.pt", "mdnrnn.pt"):
        shutil.copy(tiny_run / name, tmp_path / name)
    with pytest.raises(SystemExit) as e:
        evaluate.load_agent(str(tmp_path))
    assert "controller.pt" in str(e.value) and str(tmp_path) in str(e.value)


def test_every_policy_meets_the_same_levels():
    """play()'s premise: env i's first level depends only on (seed, i), not on the number of envs."""
    levels = lambda num, seed: [info["level_seed"] for info in collect.make_env(num, "easy", seed=seed).get_info()]
    assert levels(8, TEST_SEED) == levels(8, TEST_SEED) == levels(32, TEST_SEED)[:8]
    assert levels(8, TEST_SEED) != levels(8, TEST_SEED + 1)


def test_play_is_deterministic_and_counts_first_episodes_only(tiny_run, one_torch_thread):
    agent = evaluate.load_agent(str(tiny_run))
    for make in (lambda: evaluate.RandomPolicy(5), lambda: agent):
        r1, l1 = evaluate.play(make(), 24, TEST_SEED, "easy")
        r2, l2 = evaluate.play(make(), 24, TEST_SEED, "easy")
        assert np.array_equal(r1, r2) and np.array_equal(l1, l2)
        # One episode each: a single 10 at most (leaper pays only for the finish), 1..500 steps.
        assert set(np.unique(r1).tolist()) <= {0.0, 10.0}
        assert l1.min() >= 1 and l1.max() <= collect.MAX_STEPS


def test_agent_plays_exactly_like_the_training_rollout(tiny_run, one_torch_thread):
    """The same controller on the same levels: evaluate's Agent + play() == controller.rollout."""
    agent = evaluate.load_agent(str(tiny_run))
    levels = [info["level_seed"] for info in collect.make_env(12, "easy", seed=TEST_SEED).get_info()]
    returns, _ = evaluate.play(agent, 12, TEST_SEED, "easy")
    trained, _ = controller.rollout(agent.vae, agent.mdn, agent.weights.reshape(1, -1).numpy(), levels, "easy",
                                    agent.inputs)
    assert np.array_equal(returns, trained[0])


def test_always_up_wins_a_third_of_easy_levels():
    """Measured: 32.8% over 2000 held-out easy levels; 300 episodes have std 2.7%: tolerance 3 std."""
    returns, lengths = evaluate.play(evaluate.Always(), 300, TEST_SEED, "easy")
    s = evaluate.summarize(returns, lengths)
    assert abs(s["win_rate"] - 0.328) < 0.08, s
    assert s["mean_return"] == pytest.approx(10 * s["win_rate"])


def load_probe(name):
    """A probe script of docs/ as a module (docs/ is not a package)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, os.path.join(HERE, "docs", name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_lookahead_ceiling_wins_where_always_up_dies():
    """The cheating ceiling (96% on 200 held-out easy levels) must beat always-UP on the same levels,
    and cloning the state must leave the played env untouched: same result twice."""
    lookahead = load_probe("probe_lookahead").lookahead
    up, _ = evaluate.play(evaluate.Always(), 10, TEST_SEED, "easy")
    la, lengths = evaluate.play(lookahead("easy"), 10, TEST_SEED, "easy")
    assert (la == 10).sum() >= 8 and (la == 10).sum() > (up == 10).sum() + 3, (la, up)
    assert np.array_equal(evaluate.play(lookahead("easy"), 10, TEST_SEED, "easy")[1], lengths)


def test_probe_fit_recovers_a_linear_rule_in_c_units():
    """docs/probe_linear_c.py: softmax regression on standardised features, folded back into C's
    raw-unit weights, must act exactly as the standardised model and recover a linear rule."""
    probe = load_probe("probe_linear_c")
    g = torch.Generator().manual_seed(0)
    X = torch.randn(2000, 6, generator=g) * torch.tensor([1.0, 5, 0.1, 2, 1, 30]) + 3  # uneven scales, offset
    y = ((X - 3) / torch.tensor([1.0, 5, 0.1, 2, 1, 30]) @ torch.randn(6, 5, generator=g)).argmax(1)
    train = torch.arange(2000) < 1500
    weights, acc = probe.fit(X, y, train, steps=600)
    assert weights.shape == (5, 7) and acc > 0.9, acc
    raw = controller.choose(weights, X[~train])  # C's own rule on raw features
    assert acc == pytest.approx((raw == y[~train]).float().mean().item(), abs=2e-3)


def test_danger_probe_rule_waits_when_told():
    probe = load_probe("probe_danger")
    frames, first = np.zeros((3, 64, 64, 3), np.uint8), np.array([True, False, True])
    safe, deadly = (probe.danger_rule(lambda x, v=v: torch.full((len(x), 1), v), 0.5) for v in (-9.0, 9.0))
    assert (safe.act(frames, first) == collect.ACTIONS[collect.UP]).all()  # not deadly: hop
    assert (deadly.act(frames, first) == collect.ACTIONS[collect.ACTION_NAMES.index("NONE")]).all()  # wait


def test_rules_probe_counts_steps_since_the_last_up(tiny_run, capsys, one_torch_thread):
    """docs/probe_rules.py: Counting freezes each env's "steps since its last UP" when its episode ends, and the
    probe plays M's hop head rule (tiny_run has no D) with a shifted threshold."""
    probe = load_probe("probe_rules")
    up, none = collect.ACTIONS[collect.UP], collect.ACTIONS[collect.NONE]
    script = iter([[up, up], [none, none], [none, up], [up, up]])  # env 0 plays 4 steps, env 1 only 2
    fake = type("Fake", (), dict(reset=lambda self, n: None, act=lambda self, obs, first, alive: np.array(next(script))))
    counting = probe.Counting(fake())
    counting.reset(2)
    for alive in ([True, True], [True, True], [True, False], [True, False]):
        counting.act(np.zeros((2, 64, 64, 3), np.uint8), np.zeros(2, bool), np.array(alive))
    assert counting.final.tolist() == [0, 1]  # env 0: UP at its last step; env 1: one NONE after its last UP
    probe.main(probe.ProbeConfig(run=str(tiny_run), episodes=4, thresholds="0,-2"))
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("M hop head")]
    assert [r.split(",")[1].split()[:2] for r in rows] == [["thr", "0"], ["thr", "-2"]]
    probe.main(probe.ProbeConfig(run=str(tiny_run), episodes=4, thresholds="0", escape="1", mirror=True))
    rows = [line[:38].strip() for line in capsys.readouterr().out.splitlines() if line.startswith("M hop head")]
    assert rows == ["M hop head, thr 0", "M hop head, thr 0 mirrored", "M hop head, thr 0 mirrored, escape 1"]


def test_rules_probe_escapes_to_the_safest_move_and_reads_the_mirror():
    """Safest: UP iff its logit < thr; else the lowest logit but UP's, waiting's lowered by the margin (None: wait).
    Mirrored, move m's logit is averaged with the mirror image's logit of MIRROR[m] (LEFT <-> RIGHT)."""
    probe = load_probe("probe_rules")
    LEFT, DOWN, NONE, UP = (collect.ACTION_NAMES.index(a) for a in ("LEFT", "DOWN", "NONE", "UP"))
    table = torch.tensor([[0.0, 5, 9, 2, 1], [0.0, 5, 9, -3, 1], [7.0, 5, 3, 2, 9]])  # (3 envs, 5 moves) logits
    mdn = types.SimpleNamespace(hop=lambda z, z_last, a: table[torch.arange(len(a)), a])
    z = torch.zeros(3, 4)
    for margin, want in ((1.0, [LEFT, UP, NONE]), (None, [NONE, UP, NONE])):
        assert probe.Safest(None, mdn, -1.0, margin).decide(z, z, None, None, None, None).tolist() == want
    mdn.hop = lambda z, z_last, a: z[:, 0] + a.float()  # logit = move index, +10 on the mirrored z
    safest = probe.Safest(None, mdn, 7.9, 0.0, mirror=True)
    safest.zm = z + 10, z + 10
    assert safest.decide(z, z, None, None, None, None).tolist() == [DOWN] * 3  # LEFT = RIGHT = NONE = 7, DOWN 6, UP 8
    safest.thr = 8.5
    assert safest.decide(z, z, None, None, None, None).tolist() == [UP] * 3
    for flags, said in ((dict(escape="1,x"), "--escape 1,x: expected"), (dict(thresholds=""), "--thresholds: expected")):
        with pytest.raises(SystemExit) as e:
            probe.ProbeConfig(**flags)
        assert said in str(e.value)


def test_on_policy_probe_labels_the_last_up_and_records_steps_since_it(tiny_run, capsys, one_torch_thread):
    """docs/probe_on_policy.py: only an env's last UP can be the one it died of, and only within the window; the
    rule (always safe here) records each UP with the steps since the env's last; main prints the four rows."""
    probe = load_probe("probe_on_policy")
    env, t = np.array([0, 0, 1, 1, 2]), np.array([0, 3, 0, 1, 10])  # (U,) in the order of play
    ret, length = np.array([0.0, 10.0, 0.0]), np.array([6, 20, 30])  # env 0 died, env 1 won, env 2 died late
    assert probe.deadly(env, t, ret, length, window=5).tolist() == [False, True, False, False, False]
    assert probe.deadly(env, t, ret, length, window=20).tolist() == [False, True, False, False, True]
    v = type("V", (), dict(z_dim=4, encode=lambda self, x: (torch.zeros(len(x), 4),)))()
    m = type("M", (), dict(hop=lambda self, z, z_last, a: torch.full((len(z),), -1.0)))()
    rule = probe.Rule(v, m, None, "m", explore=0.0, seed=0)
    rule.reset(2)
    for alive in ([True, True], [True, True], [True, False]):
        actions = rule.act(np.zeros((2, 64, 64, 3), np.uint8), np.zeros(2, bool), np.array(alive))
        assert (actions[alive] == collect.ACTIONS[collect.UP]).all()
    assert [(e, s) for e, _, _, _, s in rule.ups] == [(0, 1 + collect.MAX_STEPS), (1, 1 + collect.MAX_STEPS),
                                                      (0, 1), (1, 1), (0, 1)]
    probe.main(probe.ProbeConfig(run=str(tiny_run), episodes=4))
    rows = capsys.readouterr().out.splitlines()
    assert [r.split()[0] for r in rows[-4:]] == ["1", "2-4", "5+", "all"], rows


def test_shape_v_probe_trains_v_through_the_hop_loss(tiny_run, capsys, one_torch_thread):
    """docs/probe_shape_v.py: a few joint steps change V's encoder and report the hop head's AUC and the rule."""
    probe = load_probe("probe_shape_v")
    probe.main(probe.ProbeConfig(run=str(tiny_run), hop_steps=1024, steps=2, episodes=4))
    out = capsys.readouterr().out
    before, after = (float(line.split()[-1]) for line in out.splitlines() if "error per frame" in line)
    assert before != after and "held-out UP AUC" in out and "of 4 held-out levels won" in out


def test_frog_probe_finds_the_frog_by_colour_and_trains_three_heads(tiny_run, tmp_path, capsys, one_torch_thread):
    """docs/probe_frog.py: the frog's green lands in its own 8x8 cell (and in the mirror cell of a flipped frame),
    a car's yellow and the road's grey in none; main trains the three heads and prints a row per epoch; a flat V
    is refused with one error line."""
    probe = load_probe("probe_frog")
    frame = np.full((1, 64, 64, 3), 87, np.uint8)  # a grey road
    frame[0, 57:60, 51:54] = (168, 196, 50)  # a hard-mode frog (3x3 px) in cell (row 7, column 6)
    frame[0, 20:22, 10:14] = (255, 204, 0)  # a yellow car
    x = vae.to_input(frame)
    cells = probe.frog_cells(x)
    assert cells.shape == (1, 64) and cells[0].nonzero()[:, 0].tolist() == [7 * 8 + 6]
    assert cells[0, 62].item() == pytest.approx(9 / 64 * 8)
    assert probe.frog_cells(x.flip(-1))[0].nonzero()[:, 0].tolist() == [7 * 8 + 1]  # x 51-53 -> 10-12
    path = tmp_path / "vae.pt"
    torch.save(dict(model=vae.ConvVAE(64, spatial=True).state_dict(), config=dict(z_dim=64, spatial=True)), path)
    probe.main(probe.ProbeConfig(vae=str(path), hop_steps=2048, epochs=2))
    rows = capsys.readouterr().out.splitlines()
    assert rows[-3].split() == ["epoch", "V's", "z", "z", "+", "frog", "frog", "alone"] and rows[-1].split()[0] == "2"
    with pytest.raises(SystemExit) as e:  # tiny_run's V is flat
        probe.main(probe.ProbeConfig(vae=str(tiny_run / "vae.pt")))
    assert str(e.value).startswith("error: ") and "flat" in str(e.value)


def test_dream_dynamics_probe_feeds_m_its_own_point_estimates(tiny_run, capsys, one_torch_thread):
    """docs/probe_dream_dynamics.py: open_loop feeds M its own mixture mean (or likeliest component) step after
    step; main plays the real hop and wait trajectories and prints one row per step."""
    probe = load_probe("probe_dream_dynamics")

    class Shift:  # two components: z + 1 with weight sigmoid(2), z - 1 with weight sigmoid(-2)
        def step(self, z, a, state):
            mu = torch.stack([z + 1, z - 1], -1)[:, None]  # (N,1,Z,2)
            pi = torch.tensor([2.0, 0.0]).expand_as(mu)
            return (pi, mu, torch.zeros_like(mu)), None, None, state
    z0 = torch.zeros(3, 4)
    p = torch.sigmoid(torch.tensor(2.0)).item()
    assert torch.allclose(probe.open_loop(Shift(), z0, [0, 0, 0], "mode")[-1], torch.full((3, 4), 3.0))
    assert torch.allclose(probe.open_loop(Shift(), z0, [0, 0, 0], "mean")[-1], torch.full((3, 4), 3 * (2 * p - 1)))
    res = probe.main(probe.ProbeConfig(run=str(tiny_run), episodes=4, steps=8, hop_every=4))
    assert res["noise"] > 0 and res["rows"] and all(0 <= r["closer"] <= 1 for r in res["rows"])
    assert "closer to hop" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:  # tiny_run's V is flat
        probe.main(probe.ProbeConfig(run=str(tiny_run), transition="conv"))
    assert str(e.value).startswith("error: --transition conv: ") and "flat" in str(e.value)


def test_conv_transition_learns_that_up_moves_the_frog(tmp_path, capsys, one_torch_thread):
    """docs/probe_dream_dynamics.py --transition conv: on synthetic latents (one channel on the 8x8 grid, a "frog"
    of value 3 in one cell that UP moves a row up), the conv transition learns the rule, and its open loop moves
    the frog two rows for two UPs, wherever it starts; the probe then runs on a real run's latents."""
    probe, rng = load_probe("probe_dream_dynamics"), np.random.default_rng(0)
    (tmp_path / "latents").mkdir()
    for i in range(41):  # every 20th left out: 38 for training
        row, col, mu, action = 7, rng.integers(8), [], rng.integers(0, 5, 16)
        for a in action:
            grid = np.zeros((8, 8), np.float16)
            grid[row, col] = 3
            mu.append(grid.ravel())
            row = max(row - 1, 0) if a == collect.UP else row
        np.savez(tmp_path / "latents" / f"episode_{i:06d}.npz", mu=np.stack(mu), action=action.astype(np.int8))
    model = probe.train_conv(str(tmp_path / "latents"), 300, width=16)
    z0 = torch.zeros(8, 8, 8)  # (N,8,8): frogs in row 7, columns 0..7
    z0[torch.arange(8), 7, torch.arange(8)] = 3
    out = probe.open_loop_conv(model, z0.view(8, 64), [collect.UP, collect.NONE, collect.UP])  # (4,8,64)
    frog = out[-1].view(8, 8, 8).flatten(1).argmax(1)  # (8,) the cell that holds most of the frog
    assert frog.tolist() == [5 * 8 + c for c in range(8)]  # two rows up, same column
    assert "conv transition step 300" in capsys.readouterr().out
    run = tmp_path / "run"  # a spatial V and its latents of real episodes: main trains and plays the transition
    collect_quiet(run / "data", episodes=8, num_envs=8)
    vae.train(VAEConfig(data=str(run / "data"), out=str(run / "vae.pt"), z_dim=64, spatial=True, epochs=1, batch_size=64))
    mdnrnn.encode_episodes(str(run / "data"), str(run / "vae.pt"), str(run / "latents"))
    res = probe.main(probe.ProbeConfig(run=str(run), episodes=4, steps=8, hop_every=4, transition="conv", conv_steps=20))
    assert res["rows"] and all(0 <= r["closer"] <= 1 for r in res["rows"])
    assert "the conv transition" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:  # no latents/: one error line naming the dir
        probe.train_conv(str(tmp_path / "nowhere"), 1)
    assert str(e.value).startswith(f"error: {tmp_path / 'nowhere'}: expected the run's episodes")


def synthetic_frog_latents(latents, episodes, rng):
    """Episodes of a toy frog game on V's grid (one channel, z_dim 64), as mdnrnn.py encodes them: a "frog" of value
    3 in one cell; UP moves it a row up and wins on reaching row 0, LEFT kills it, every other move does nothing."""
    os.makedirs(latents, exist_ok=True)
    for i in range(episodes):
        row, col, mu, actions, reward = rng.integers(1, 8), rng.integers(8), [], [], []
        for t in range(16):
            grid = np.zeros((8, 8), np.float16)
            grid[row, col] = 3
            mu.append(grid.ravel())
            actions.append(rng.choice(5, p=[0.1, 0.1, 0.2, 0.5, 0.1]))
            row -= actions[-1] == collect.UP
            reward.append(10.0 * (row == 0))
            if row == 0 or actions[-1] == 0:  # a win, or LEFT: the end
                break
        done = np.zeros(len(mu), bool)
        done[-1] = row == 0 or actions[-1] == 0  # the 16-step ones were cut, not ended
        np.savez(os.path.join(latents, f"episode_{i:06d}.npz"), mu=np.stack(mu), action=np.array(actions, np.int8),
                 reward=np.array(reward, np.float32), done=done)


def test_grid_dream_probe_learns_a_toy_frog_game(tmp_path, capsys, one_torch_thread):
    """docs/probe_grid_dream.py: on a toy frog game, the grid model (trained unrolled) tells wins and deaths apart on
    held-out steps, and its dream at a low temperature lets always-UP win, kills always-LEFT and never ends
    always-NONE; main then runs end to end (C searched in the dream, real checks) on a spatial V."""
    import imageio.v2 as imageio
    probe, rng = load_probe("probe_grid_dream"), np.random.default_rng(0)
    run = tmp_path / "run"
    synthetic_frog_latents(str(run / "latents"), 200, rng)
    cfg = probe.ProbeConfig(run=str(run), steps=400, unroll=2, width=16, tau=0.01, episodes=8, generations=1,
                            popsize=4, dream_episodes=2, max_steps=20, check_levels=2, test_episodes=4)
    model, row = probe.train_grid(cfg)
    assert row["win_auc"] > 0.95 and row["death_auc"] > 0.95 and row["error"] < 0.5 * row["copy_error"]
    mdn = mdnrnn.MDNRNN(64, hidden=4, gaussians=1)
    z0 = torch.zeros(16, 8, 8)  # (N,8,8): frogs in row 7
    z0[torch.arange(16), 7, torch.arange(16) % 8] = 3
    torch.manual_seed(0)
    ends = {a: probe.grid_dream(model, mdn, lambda z, h, up, idx: torch.full((len(idx),), a), z0.view(16, 64), 0.01, 40)
            for a in (collect.UP, collect.NONE, 0)}
    assert (ends[collect.UP][0] == 10).float().mean() >= 0.9 and ends[collect.UP][1].float().mean() < 12
    assert (ends[0][0] == 0).all() and (ends[0][1] <= 2).float().mean() >= 0.9  # always-LEFT: dead at once
    assert (ends[collect.NONE][1] == 40).float().mean() >= 0.9  # always-NONE: neither wins nor dies
    assert "grid step 400" in capsys.readouterr().out
    collect_quiet(run / "data", episodes=8, num_envs=8)  # a spatial V of z_dim 64 and an M on it: main's whole path
    vae.train(VAEConfig(data=str(run / "data"), out=str(run / "vae.pt"), z_dim=64, spatial=True, epochs=1, batch_size=64))
    mdnrnn.train(MDNConfig(data=str(run / "data"), vae=str(run / "vae.pt"), out=str(run / "mdnrnn.pt"),
                           latents=str(tmp_path / "real_latents"), hidden=8, gaussians=1, epochs=1, hop_steps=0))
    res = probe.main(dataclasses.replace(cfg, steps=20, strip=str(tmp_path / "s.png")))
    assert set(res["constant"]) == set(collect.ACTION_NAMES) and res["search"]["episodes"] == 4
    assert imageio.imread(tmp_path / "s.png").shape == (8 * 64, 25 * 64, 3)  # 4 levels: real above dreamt
    out = capsys.readouterr().out
    assert "C generation 1: dream mean" in out and "real validation wins" in out and "held out:" in out
    s = res["search"]  # held-out episodes end in a win, a death within 5 steps of an UP or later, or the cap
    assert s["win_rate"] + s["died_hopping"] + s["died_waiting"] + s["timeout"] == pytest.approx(1)
    bench = load_probe("dream_bench")  # run alone: the same table for M's own dream
    table = bench.main(bench.BenchConfig(run=str(run), episodes=4, tau=0.5))
    assert set(table) == set(collect.ACTION_NAMES)
    assert all(r["win"] + r["death"] <= 1 and 1 <= r["length"] <= collect.MAX_STEPS for r in table.values())


@pytest.mark.parametrize("kind", ["bins", "codes"])
def test_grid_dream_probe_sharp_dreams_play_the_toy_game(kind, tmp_path, one_torch_thread):
    """probe_grid_dream --bins (a categorical over each latent's change) and --codes (a categorical over k-means codes
    per cell, docs/probe_code_dream.py): the loss is -log p of the bin or code nearest the target (checked against
    torch.distributions), every dreamt value is a bin's change or a code (no average of two places), and on the toy
    frog game the dream lets always-UP win, kills always-LEFT within a few steps and never ends always-NONE."""
    probe, rng = load_probe("probe_grid_dream"), np.random.default_rng(0)
    synthetic_frog_latents(str(tmp_path / "run" / "latents"), 200, rng)
    cfg = probe.ProbeConfig(run=str(tmp_path / "run"), steps=400, unroll=2, width=16, tau=0.01,
                            bins=33 if kind == "bins" else 0, codes=4 if kind == "codes" else 0)
    model, row = probe.train_grid(cfg)
    assert row["win_auc"] > 0.95 and row["death_auc"] > 0.95 and row["error"] < 0.5 * row["copy_error"]
    z, target = torch.randn(3, 64), torch.rand(3, 64) * 8 - 4  # (N,Z) each; some changes outside the bins' [-3, 3]
    if kind == "bins":  # logits (N,Z,B); a change beyond the end bins counts as the end bin
        dist, values = (torch.randn(3, 64, 33), z), model.centres
        nearest = ((target - z).clamp(-probe.LIMIT, probe.LIMIT)[..., None] - values).abs().argmin(-1)  # (N,Z)
    else:  # logits (N,64,K); the toy's cells are 1 latent each, its codes the frog's 3 and the background's 0
        dist, values = (torch.randn(3, 64, 4),), model.codebook[:, 0]
        assert sorted(set(values.tolist())) == [0.0, 3.0]
        nearest = (target[..., None] - values).abs().argmin(-1)  # (N,64)
    want = -torch.distributions.Categorical(logits=dist[0]).log_prob(nearest)
    assert torch.allclose(model.nll(dist, target), want, atol=1e-5)
    z0 = torch.zeros(16, 8, 8)  # (N,8,8): frogs in row 7
    z0[torch.arange(16), 7, torch.arange(16) % 8] = 3
    torch.manual_seed(0)
    z = model.sample(model(z0.view(16, 64), z0.view(16, 64), torch.full((16,), collect.UP))[0], 1.0)
    assert torch.isin(z - z0.view(16, 64) if kind == "bins" else z, values).all()  # every value a bin's or a code
    mdn = mdnrnn.MDNRNN(64, hidden=4, gaussians=1)
    ends = {a: probe.grid_dream(model, mdn, lambda z, h, up, idx: torch.full((len(idx),), a), z0.view(16, 64), 0.01, 40)
            for a in (collect.UP, collect.NONE, 0)}
    assert (ends[collect.UP][0] == 10).float().mean() >= 0.9 and ends[collect.UP][1].float().mean() < 12
    assert (ends[0][0] == 0).all() and ends[0][1].float().mean() < 3  # always-LEFT: dead within a few steps
    assert (ends[collect.NONE][1] == 40).float().mean() >= 0.9  # always-NONE: neither wins nor dies


def test_code_dream_probe_pictures_quantised_frames(tmp_path, capsys):
    """docs/probe_code_dream.py run alone: k-means codes of a spatial V's cells, the more codes the closer the
    quantised z of held-out frames, and a picture of the first frames decoded as they are and quantised three ways."""
    import imageio.v2 as imageio
    probe, run = load_probe("probe_code_dream"), tmp_path / "run"
    collect_quiet(run / "data", episodes=24, num_envs=8)  # 24: episode 19 is held out
    vae.train(VAEConfig(data=str(run / "data"), out=str(run / "vae.pt"), z_dim=64, spatial=True, epochs=1, batch_size=64))
    mdnrnn.encode_episodes(str(run / "data"), str(run / "vae.pt"), str(run / "latents"))
    probe.main(probe.CodesConfig(run=str(run), out=str(tmp_path / "codes.png"), frames=3))
    errors = [float(line.split()[-1]) for line in capsys.readouterr().out.splitlines() if " codes: " in line]
    assert len(errors) == 4 and errors[0] == 0 and errors[1] > errors[2] > errors[3]
    assert imageio.imread(tmp_path / "codes.png").shape == (4 * 64, 3 * 64, 3)


def synthetic_frog_frames(run, episodes, rng):
    """A toy frog game in frames and in V's grid: a 2x2 frog-green frog centred at (y, x) = (11.5 + 4 k, 3.5 + 8 col);
    UP moves it 4 pixels up and wins on reaching y 7.5 (V's top row of cells), LEFT kills it, every other move does
    nothing. data/ holds the frames (collect.py's format), latents/ a grid z, nonzero at the frog's cell (mdnrnn.py's)."""
    for d in ("data", "latents"):
        os.makedirs(os.path.join(run, d), exist_ok=True)
    for i in range(episodes):
        y, col, obs, mu, actions, reward = 11.5 + 4 * rng.integers(0, 13), rng.integers(8), [], [], [], []
        for t in range(24):
            frame, grid = np.zeros((64, 64, 3), np.uint8), np.zeros((8, 8), np.float16)
            frame[int(y):int(y) + 2, 8 * col + 3:8 * col + 5] = (160, 220, 40)  # rows y-0.5, y+0.5
            grid[int(y) // 8, col] = 2 + (y % 8) / 3.5  # 3 or 4.1: the frog's place in its cell is in z too
            obs.append(frame), mu.append(grid.ravel())
            actions.append(rng.choice(5, p=[0.1, 0.1, 0.2, 0.5, 0.1]))
            y -= 4 * (actions[-1] == collect.UP)
            reward.append(10.0 * (y < 8))
            if y < 8 or actions[-1] == 0:  # a win, or LEFT: the end
                break
        done = np.zeros(len(mu), bool)
        done[-1] = y < 8 or actions[-1] == 0  # the 24-step ones were cut, not ended
        ep = dict(action=np.array(actions, np.int8), reward=np.array(reward, np.float32), done=done)
        np.savez(os.path.join(run, "data", f"episode_{i:06d}.npz"), obs=np.stack(obs), **ep)
        np.savez(os.path.join(run, "latents", f"episode_{i:06d}.npz"), mu=np.stack(mu), **ep)


def test_frog_dream_probe_moves_one_frog_and_plays_the_toy_game(tmp_path, capsys, one_torch_thread):
    """docs/probe_frog_dream.py: the frog's centre found by its colour; on a toy frog game the locator finds the
    frog in V's z, the frog model predicts its moves, wins and deaths on held-out steps, every dreamt frog moves by a
    whole class of -4..4 pixels and stays on the screen, and the dream at a low temperature lets always-UP win, kills
    always-LEFT and never ends always-NONE; main then runs end to end on a spatial V (C searched in the dream)."""
    import imageio.v2 as imageio
    probe, rng, run = load_probe("probe_frog_dream"), np.random.default_rng(0), tmp_path / "run"
    frame = np.zeros((2, 64, 64, 3), np.uint8)
    frame[0, 10:13, 20:22] = (150, 200, 60)  # frog green: a 3x2 frog centred at (11, 20.5); frame 1 has none
    frame[0, 40, 40] = (255, 204, 0)  # a yellow car pixel is not the frog
    assert load_probe("probe_frog").frog_of(frame).tolist() == [[11.0, 20.5], [11.0, 20.5]]
    synthetic_frog_frames(str(run), 300, rng)
    cfg = probe.ProbeConfig(run=str(run), steps=600, unroll=2, width=16, death_steps=1, tau=0.01, episodes=8,
                            generations=1, popsize=4, dream_episodes=2, max_steps=20, check_levels=2, test_episodes=4)
    model, row = probe.trained(dataclasses.replace(cfg, model=str(tmp_path / "frog.pt")), 64)  # trains, then saves
    assert row["locator_px"] < 1.0 and row["move_acc"] > 0.9 > row["stay_acc"]
    assert row["win_auc"] > 0.95 and row["death_auc"] > 0.95
    pos = torch.tensor([[0.0, 63.0], [30.5, 31.5]]).repeat(50, 1)  # (100,2), two at the screen's corner
    moved = model.step(pos, torch.zeros(100, probe.K ** 2))  # uniform over the moves
    assert ((moved - pos).abs() <= probe.MOVE).all() and ((moved >= 0) & (moved <= 63)).all()
    assert torch.equal(moved[1::2] - pos[1::2], (moved[1::2] - pos[1::2]).round())  # whole pixels, no average
    mdn = mdnrnn.MDNRNN(64, hidden=4, gaussians=1)
    z0 = torch.zeros(16, 8, 8)  # (N,8,8): frogs in row 7, one per column
    z0[torch.arange(16), 7, torch.arange(16) % 8] = 3  # at y 59.5
    torch.manual_seed(0)
    class LeftKills(torch.nn.Module):  # a hop head for M: P(the move kills) is 1 for LEFT, 0 for the others
        def forward(self, z, z_last, a):
            return torch.where(a == 0, 30.0, -30.0)
    mdn.hop = LeftKills()
    for kind in ({}, dict(level="mean"), dict(level="mean", death="hop")):
        ends = {a: probe.frog_dream(model, mdn, lambda z, h, up, idx: torch.full((len(idx),), a), z0.view(16, 64),
                                    0.01, 40, **kind) for a in (collect.UP, collect.NONE, 0)}
        assert (ends[collect.UP][0] == 10).float().mean() >= 0.9 and ends[collect.UP][1].float().mean() < 20
        assert (ends[0][0] == 0).all() and ends[0][1].float().mean() < 3  # always-LEFT: dead within a few steps
        assert (ends[collect.NONE][1] == 40).float().mean() >= 0.9  # always-NONE: neither wins nor dies
    assert (ends[0][1] == 1).all()  # death="hop": the first LEFT, a move from rest, is sampled dead at once
    class NoneKills(torch.nn.Module):  # a hop head by which waiting kills (p 0.9 within a wait), moving never
        def forward(self, z, z_last, a):
            return torch.where(a == collect.NONE, math.log(9), -30.0)
    mdn.hop, p = NoneKills(), torch.tensor([0.01, 0.3, 0.9])  # "hop" never kills a waiting frog, "hop-wait" does
    assert torch.allclose(1 - (1 - torch.sigmoid(probe.per_step(torch.logit(p)))) ** 8.5, p, atol=1e-5)  # 8.5 steps
    for death in ("hop", "hop-wait"):
        ret, length = probe.frog_dream(model, mdn, lambda z, h, up, idx: torch.full((len(idx),), collect.NONE),
                                       z0.view(16, 64).repeat(8, 1), 0.01, 40, "mean", death)  # (128,) each
        assert ((length == 40).float().mean() >= 0.9) if death == "hop" else (length.float().mean() < 20)
    mdn.hop, seen = LeftKills(), []  # --calibrate's shift: the dream's hop logit, C's m and its deaths, moved by it
    ret, length = probe.frog_dream(model, mdn, lambda z, h, up, idx: seen.append(up) or torch.zeros_like(idx),
                                   z0.view(16, 64), 0.01, 40, "mean", "hop", shift=-60.0)  # always-LEFT
    assert (length > 1).all() and torch.equal(torch.cat(seen).unique(), torch.tensor([-90.0]))  # shift 0: dead at 1
    assert "frog step 600" in capsys.readouterr().out
    loaded, loaded_row = probe.trained(dataclasses.replace(cfg, model=str(tmp_path / "frog.pt"), tau=0.5), 64)
    assert loaded_row == row and "frog step" not in capsys.readouterr().out  # loaded (tau: the dream's, not training's)
    x = (z0.view(16, 64), z0.view(16, 64), torch.full((16,), collect.UP))
    assert torch.equal(loaded.hop(*x), model.hop(*x)) and torch.equal(loaded.hop(*x, 3), model.hop(*x, 3))
    left = torch.zeros(16, dtype=torch.long)  # imagined 3 steps ahead: LEFT kills, UP from the bottom row does not
    assert (model.hop(*x[:2], left, 3) > 2).all() and (model.hop(*x, 3) < -2).all()
    for other in (dict(steps=601), dict(follow=True)):  # a file trained otherwise: one error line, the file kept
        with pytest.raises(SystemExit) as e:
            probe.trained(dataclasses.replace(cfg, model=str(tmp_path / "frog.pt"), **other), 64)
        assert str(e.value).startswith(f"error: --model {tmp_path / 'frog.pt'} was trained with other flags")
    assert (tmp_path / "frog.pt").exists()
    here, there = torch.full((16, 2), 59.5), torch.full((16, 2), 51.5)  # the frog stays, or goes a cell up
    for m in (model, probe.FrogModel(64, 16, follow=True)):  # --follow: the level's next z reads where the frog goes
        assert torch.equal(m.z_dist(*x, here, here)[0], m.z_dist(*x, here, there)[0]) != m.follow
    real = tmp_path / "real"  # a spatial V of z_dim 64 and an M on it, on real episodes: main's whole path
    collect_quiet(real / "data", episodes=24, num_envs=8)
    vae.train(VAEConfig(data=str(real / "data"), out=str(real / "vae.pt"), z_dim=64, spatial=True, epochs=1,
                        batch_size=64))
    mdnrnn.train(MDNConfig(data=str(real / "data"), vae=str(real / "vae.pt"), out=str(real / "mdnrnn.pt"),
                           latents=str(real / "latents"), hidden=8, gaussians=1, epochs=1, hop_steps=0))
    res = probe.main(dataclasses.replace(cfg, run=str(real), steps=20, hop_steps=512, strip=str(tmp_path / "s.png"),
                                         inputs="hm"))  # C without z: its weights for h and m, and a bias
    assert set(res["constant"]) == set(collect.ACTION_NAMES) and res["search"]["episodes"] == 4
    strip = imageio.imread(tmp_path / "s.png")  # 4 levels: the real game above the dream, 25 frames each
    assert strip.shape == (8 * 64, 25 * 64, 3) and (strip[64:128] == (255, 0, 255)).all(-1).sum() >= 25 * 9
    assert {k: len(v) for k, v in res["hop_course"].items()} == {"real": 8, "dreamt": 8}  # a hop: 8 steps each
    assert res["hop_course"]["real"][3] > 5  # the real frog rises ~7 pixels in a hop (found by its colour)
    assert set(res["hop_auc"]) == {0, 6, 12}  # the death logit and its lookaheads; nan: no UP ended both ways
    assert all(0 <= x <= 1 or math.isnan(x) for x in res["hop_auc"].values())
    out = capsys.readouterr().out
    assert "C generation 1: dream mean" in out and "real validation wins" in out and "held out:" in out
    s = res["search"]  # held-out episodes end in a win, a death within 5 steps of an UP or later, or the cap
    assert s["win_rate"] + s["died_hopping"] + s["died_waiting"] + s["timeout"] == pytest.approx(1)
    assert "hop-then-wait UPs of new levels" in out
    with pytest.raises(SystemExit) as e:  # this M has no hop head to kill the dream's frog with
        probe.main(dataclasses.replace(cfg, run=str(real), death="hop"))
    assert str(e.value) == f"error: --death hop: {real}/mdnrnn.pt has no hop head (M trained with --hop-steps 0)"
    with pytest.raises(SystemExit) as e:
        probe.main(dataclasses.replace(cfg, run=str(real), calibrate=4))
    assert str(e.value).startswith("error: --calibrate and --shift move M's hop head, which --death step does not")
    mdn = mdnrnn.load_mdnrnn(str(real / "mdnrnn.pt"))
    mdn.hop = LeftKills()  # the rule: UP where it is safe (everywhere), the calibration's games replayed in the dream
    res = load_probe("probe_dream_drift").calibrated(vae.load_vae(str(real / "vae.pt")), mdn, model, 4, "easy")
    assert math.isfinite(res["shift"]) and res["calibration_steps"] > 4 and "logit shifted by" in capsys.readouterr().out
    shutil.rmtree(real / "latents")  # data/ and latents/ that disagree: one error line
    mdnrnn.encode_episodes(str(run / "data"), str(real / "vae.pt"), str(real / "latents"))
    with pytest.raises(SystemExit) as e:
        probe.train_frog(dataclasses.replace(cfg, run=str(real)))
    assert str(e.value).startswith(f"error: {real}: data/ and latents/ hold different episodes")


class ToyV:
    """synthetic_frog_frames' V: a frame -> its grid z, nonzero at the frog's cell (2 + its place in the cell / 3.5)."""
    z_dim = 64

    def encode(self, x):  # (n,3,64,64) in [0,1] -> (n,64), None
        z = torch.zeros(len(x), 8, 8)
        for i, frog in enumerate(x[:, 1] > 0.8):  # (64,64): the toy frog's green (220), nothing else is green
            rows, cols = frog.nonzero(as_tuple=True)
            if len(rows):
                y = rows.min().item() + 0.5
                z[i, int(y) // 8, cols.min() // 8] = 2 + (y % 8) / 3.5
        return z.view(len(x), 64), None


def test_dream_drift_probe_replays_each_episode_in_the_dream_step_by_step(tmp_path, one_torch_thread):
    """docs/probe_dream_drift.py on the toy frog game, where a frog model can dream exactly: each episode's actions
    replayed open-loop from its first frame keep the dreamt frog on the real one and the dreamt z on the real z at
    every step (a head reading the frog's row from z gives the same logit on both: no step is shifted), and the table
    counts every UP that starts a hop."""
    drift, frog, run = load_probe("probe_dream_drift"), load_probe("probe_frog_dream"), tmp_path / "run"
    synthetic_frog_frames(str(run), 300, np.random.default_rng(0))
    cfg = frog.ProbeConfig(run=str(run), steps=600, unroll=2, width=16, death_steps=1)
    torch.manual_seed(0)
    model = frog.trained(cfg, 64)[0]
    episodes = []
    for path in sorted(glob.glob(str(run / "data" / "*.npz")))[-40:]:
        e = collect.load_episode(path)
        episodes.append(dict(obs=e["obs"], action=collect.ACTIONS[e["action"]], died=bool(e["action"][-1] == 0)))
    mdn = mdnrnn.MDNRNN(64, hidden=4, gaussians=1)
    class Row(torch.nn.Module):  # a hop head that reads the frog's row from z (its likeliest)
        def forward(self, z, z_last, a):
            return z.view(-1, 8, 8).amax(2).argmax(1).float()
    mdn.hop = Row()
    r = drift.replay(ToyV(), mdn, model, episodes)
    live = r["alive"].clone()
    live[:, 0] = False  # step 0 has no last frame: no logit
    assert r["alive"].sum() == sum(len(e["action"]) for e in episodes) and r["last_up"].sum() <= len(episodes)
    assert (r["pos"] - r["real_pos"])[r["alive"]].norm(dim=-1).mean() < 1.0  # one step late: 2.5 pixels
    assert (r["real"] - r["dreamt"])[live].abs().mean() < 0.1 and (r["real"][live] != 0).any()  # one step late: 0.27
    rows = drift.table(r)
    fake = dict(alive=r["alive"], a=r["a"], real_pos=r["real_pos"], real=r["real"], dreamt=r["real"] + 1.3)
    assert drift.shift(fake) == pytest.approx(-1.3, abs=1e-4)  # a dream whose hop logit is 1.3 too high, taken back
    moving = (r["real_pos"][:, 1:] - r["real_pos"][:, :-1]).abs().sum(-1) >= 0.5  # (N,T-1) mid-hop at t >= 1
    assert sum(row["ups"] for row in rows) == int((live[:, 1:] & (r["a"][:, 1:] == collect.UP) & ~moving).sum())


def test_grid_dream_probe_refuses_a_flat_v_and_missing_latents(tiny_run, tmp_path):
    probe = load_probe("probe_grid_dream")
    with pytest.raises(SystemExit) as e:  # tiny_run's V is flat
        probe.main(probe.ProbeConfig(run=str(tiny_run)))
    assert str(e.value).startswith("error: ") and "flat" in str(e.value)
    with pytest.raises(SystemExit) as e:
        probe.steps_of(str(tmp_path / "nowhere"))
    assert str(e.value).startswith(f"error: {tmp_path / 'nowhere'}: expected at least 20 episodes")


def test_wilson_and_summarize():
    # By hand, z = 1.96, 5/10: centre 0.5, half width 1.96 * sqrt(0.025 + 0.009604) / 1.38416 = 0.26340.
    assert evaluate.wilson(5, 10) == pytest.approx([0.23660, 0.76340], abs=1e-4)
    assert evaluate.wilson(0, 10) == pytest.approx([0.0, 0.27753], abs=1e-4)
    s = evaluate.summarize(np.array([10.0, 0.0, 0.0, 10.0]), np.array([5, 500, 3, 7]))
    assert (s["wins"], s["episodes"], s["win_rate"], s["mean_return"], s["mean_length"]) == (2, 4, 0.5, 5.0, 128.75)


def test_cli_json_and_pictures(tiny_run, capsys, one_torch_thread):
    argv = ["--run", str(tiny_run), "--episodes", "12", "--json", "--pictures", "true", "--gif-episodes", "1",
            "--death-steps", "640"]
    evaluate.main(collect.cli(evaluate.EvalConfig, argv))
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])  # the JSON is the last line
    assert (res["distribution_mode"], res["seed"], res["episodes"]) == ("easy", TEST_SEED, 12)
    for r in (res, res["baselines"]["random"], res["baselines"]["always_up"]):
        assert r["wins"] / r["episodes"] == pytest.approx(r["win_rate"])
        assert r["ci95"][0] <= r["win_rate"] <= r["ci95"][1]
        assert r["mean_return"] == pytest.approx(10 * r["win_rate"]) and 1 <= r["mean_length"] <= collect.MAX_STEPS
    for name in ("agent.gif", "reconstructions.png", "dream.gif", "curves.png"):
        assert (tiny_run / name).stat().st_size > 0
    assert res["death_probe"]["ups"] > 0 and res["death_probe"]["d_auc"] is None  # printed; this run has no D
    with pytest.raises(SystemExit) as e:  # a dir without checkpoints: one error line naming the first missing
        evaluate.main(collect.cli(evaluate.EvalConfig, ["--run", str(tiny_run / "data")]))
    assert str(e.value).startswith("error: ") and "vae.pt" in str(e.value) and "\n" not in str(e.value)


def test_dream_gif_shows_the_first_dream_that_dies_and_the_first_that_wins(tmp_path, one_torch_thread):
    """dream.gif: of seeds 0, 1, ..., the first whose dream ends in a sampled death and the first that ends in a win,
    each after more than `least` steps; replaying those seeds' dreams (same seed, same dream) ends them so."""
    torch.manual_seed(0)
    m = m_with_heads(0.05, 0.05)  # each step: a win or a death with probability 0.05 each
    weights = torch.zeros(len(collect.ACTIONS), 4 + 8 + 1)  # C on [z, h]: all scores equal, action 0
    agent = controller.Agent(vae.ConvVAE(4).eval(), m, weights, "zh")
    frame = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    shown = evaluate.dream_gif(agent, frame, 1.0, str(tmp_path / "dream.gif"), steps=100, tries=64, least=3)
    assert set(shown) == {"dies", "WIN"}

    def replay(seed):  # (return, length) of seed's dream, played as dream_gif plays it
        torch.manual_seed(seed)
        z0 = agent.vae.encode(vae.to_input(frame[None]))[0]
        ret, length = mdnrnn.dream(m, lambda z, h, idx: torch.zeros(len(z), dtype=torch.long), z0, 1.0, max_steps=100)
        return ret.item(), length.item()
    ends = [replay(seed) for seed in range(max(shown.values()) + 1)]  # [(return, length)]
    kinds = [("WIN" if r > 0 else "dies" if n < 100 else "") if n > 3 else "" for r, n in ends]
    assert {k: kinds.index(k) for k in ("dies", "WIN")} == shown  # the first of each kind, no earlier one
    from PIL import Image
    gif = Image.open(tmp_path / "dream.gif")
    assert gif.size == (512, 272) and gif.n_frames > 2 * 3  # (64,128) x4 + the caption strip; both dreams' steps


def test_pretrained_agents_load_and_play(one_torch_thread):
    """The committed weights (float16 exports of the default runs) play without any training."""
    for mode in ("easy", "hard"):
        run = os.path.join(HERE, "pretrained", mode)
        agent = evaluate.load_agent(run)
        assert agent.distribution_mode == mode and agent.vae.spatial
        returns, lengths = evaluate.play(agent, 16, TEST_SEED, mode)
        assert returns.shape == (16,) and set(np.unique(returns)) <= {0.0, 10.0} and lengths.min() >= 1
        assert sum(os.path.getsize(os.path.join(run, f)) for f in os.listdir(run)) < 12e6


# ---------------------------------------------------------------- danger.py

def test_hop_then_wait_labels_and_auc():
    X, y = danger.hop_then_wait("easy", 3000, 16, seed=0)
    assert X.shape == (len(y), 64, 64, 6) and X.dtype == np.uint8 and len(y) > 20
    assert 0 < y.mean() < 1 and set(np.unique(y)) <= {0.0, 1.0}
    assert np.array_equal(danger.hop_then_wait("easy", 3000, 16, seed=0)[1], y)  # same seed, same data
    score = np.random.default_rng(0).normal(size=len(y)) + y  # deaths score higher on average
    pairs = [(a > b) + 0.5 * (a == b) for a in score[y > 0] for b in score[y == 0]]  # brute force
    assert danger.auc(score, y) == pytest.approx(np.mean(pairs))


def test_death_probe_scores_every_up_of_held_out_levels(tiny_run):
    """death_probe plays the same hop-then-wait as D's data and M's hop head's (same seed, same UPs), scoring each UP
    with D and with V + M: its AUCs are D's over hop_then_wait's frame pairs and M's over hop_latents' UPs."""
    torch.manual_seed(0)
    d, v, m = danger.DangerNet().eval(), vae.load_vae(str(tiny_run / "vae.pt")), mdnrnn.load_mdnrnn(str(tiny_run / "mdnrnn.pt"))
    r = danger.death_probe(v, m, d, "easy", steps=1600, num_envs=16, seed=5)
    X, y = danger.hop_then_wait("easy", 1600, 16, seed=5)
    assert r["ups"] == len(y) > 20 and r["deadly"] == pytest.approx(y.mean())
    assert r["d_auc"] == pytest.approx(danger.auc(danger.scores(d, X, np.arange(len(y))).numpy(), y), abs=1e-6)
    h = danger.hop_latents(v, "easy", 1600, 16, seed=5)  # the same play, every move, as V sees it
    up = h["action"] == collect.UP
    assert np.array_equal(h["died"][up], y) and set(np.unique(h["action"])) == set(range(5))
    with torch.no_grad():
        m_logit = m.hop(torch.from_numpy(h["z"][up]), torch.from_numpy(h["z_last"][up]), torch.full((len(y),), collect.UP))
    assert r["m_auc"] == pytest.approx(danger.auc(m_logit.numpy(), y), abs=1e-6)
    m.hop = None  # an M without a hop head (from before it, or --hop-steps 0): no answer, no crash
    assert danger.death_probe(v, m, d, "easy", steps=160, num_envs=16, seed=5)["m_auc"] is None
    assert danger.death_probe(v, m, None, "easy", steps=160, num_envs=16, seed=5)["d_auc"] is None
    assert danger.death_probe(v, m, d, "easy", steps=3, seed=5)["ups"] == 0  # too short for an UP to end: no crash


def test_danger_trains_saves_and_refuses_to_overwrite(tmp_path):
    cfg = danger.DangerConfig(out=str(tmp_path / "danger.pt"), steps=4096, num_envs=32, epochs=2)
    model = danger.train(cfg)
    ckpt = torch.load(cfg.out, weights_only=True)
    assert ckpt["env_steps"] == 4096 and ckpt["config"]["epochs"] == 2 and 0 <= ckpt["test_auc"] <= 1
    frames = np.random.default_rng(0).integers(0, 256, (5, 64, 64, 3), dtype=np.uint8)
    with torch.no_grad():
        assert torch.equal(danger.load_danger(cfg.out)(frames, frames[::-1].copy()), model(frames, frames[::-1].copy()))
    assert len(open(tmp_path / "danger.jsonl").read().splitlines()) == 2
    with pytest.raises(SystemExit) as e:
        danger.train(cfg)
    assert "exists" in str(e.value)


def test_c_reads_d(tiny_run, tmp_path, one_torch_thread):
    """C on zhd: the only weight on d says "wait when D says deadly". A D that always says deadly
    makes the frog stand until the cap; one that never does makes it always-UP."""
    v, m = vae.load_vae(str(tiny_run / "vae.pt")), mdnrnn.load_mdnrnn(str(tiny_run / "mdnrnn.pt"))
    D = n_features("zhd")
    w = np.zeros((5, D + 1))
    w[collect.UP, -1], w[collect.UP, -2] = 1.0, -1.0  # UP's score: 1 - d; the others 0
    levels = controller.level_draw(3, 0, 6)
    for bias, expect_moves in ((20.0, False), (-20.0, True)):
        d = danger.DangerNet()
        torch.nn.init.zeros_(d.net[-1].weight)
        torch.nn.init.constant_(d.net[-1].bias, bias)  # logit of "deadly", whatever the frames
        returns, steps = controller.rollout(v, m, w.ravel()[None], levels, "easy", "zhd", max_steps=40, danger=d)
        up, up_steps = controller.rollout(v, m, up_params(D)[None], levels, "easy", "zhd", max_steps=40, danger=d)
        if expect_moves:
            assert np.array_equal(returns, up) and steps == up_steps
        else:
            assert steps == 40 * len(levels) and (returns == 0).all()  # stood still on every level


# ---------------------------------------------------------------- train.py

def test_d_and_its_input_go_together(tmp_path, tiny_run):
    import train
    with pytest.raises(SystemExit) as e:  # C would read a D that no stage trains
        train.run(train.parse_args(["--preset", "tiny", "--out", str(tmp_path / "r"), "--danger-steps", "0"]))
    assert "--danger-steps 0" in str(e.value) and not os.path.exists(tmp_path / "r")
    with pytest.raises(SystemExit) as e:  # C on d without a D checkpoint
        controller.train(CConfig(out=str(tmp_path / "c.pt"), inputs="zhd", vae=str(tiny_run / "vae.pt"),
                                 mdnrnn=str(tiny_run / "mdnrnn.pt"), danger=str(tmp_path / "no.pt")))
    assert str(e.value).startswith(f"error: {tmp_path / 'no.pt'}: ") and "\n" not in str(e.value)
    assert not os.path.exists(tmp_path / "c.pt")


def interrupt_at(marker, sig, *args):
    """Run python *args until a line of its output starts with marker, then send it sig; -> (rc, out, err)."""
    import signal
    p = subprocess.Popen([sys.executable, *args], cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
    out = []
    for line in p.stdout:
        out.append(line)
        if line.startswith(marker):
            time.sleep(0.3)  # inside the stage
            p.send_signal(getattr(signal, sig))
            break
    rest, err = p.communicate(timeout=300)
    return p.returncode, "".join(out) + rest, err


def test_train_tiny_survives_interrupts_then_skips(tmp_path):
    """Ctrl-C (or a SIGKILL) inside each stage, then the same command again: the run finishes."""
    out = tmp_path / "run"
    cmd = ("train.py", "--preset", "tiny", "--out", str(out), "--eval-episodes", "40")
    for stage, sig in ((1, "SIGINT"), (2, "SIGINT"), (3, "SIGKILL"), (4, "SIGINT"), (5, "SIGINT")):
        rc, stdout, err = interrupt_at(f"== {stage}/5", sig, *cmd)
        if rc == 0:  # the stage, and all after it, finished before the signal came
            break
        assert rc == (130 if sig == "SIGINT" else -9), (stage, rc, err[-2000:])
        if sig == "SIGINT":
            assert "Traceback" not in err and err.strip().splitlines()[-1] == (
                "interrupted: what finished is saved; run the same command to continue"), err[-2000:]
        for done in range(1, stage - 1):  # stages that finished before the last interrupt are not done again
            assert {1: "nothing to do", 2: "vae.pt already has", 3: "mdnrnn.pt already has",
                    4: "danger.pt already has"}[done] in stdout, (stage, done, stdout[-3000:])
    r = run_cli(*cmd)
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("data", "vae.pt", "vae.png", "latents", "mdnrnn.pt", "danger.pt", "controller.pt", "summary.json",
                 "vae.jsonl", "mdnrnn.jsonl", "danger.jsonl", "controller.jsonl"):
        assert os.path.exists(out / name), name
    mtimes = {p: os.path.getmtime(out / p) for p in ("vae.pt", "mdnrnn.pt", "danger.pt", "controller.pt")}
    again = run_cli("train.py", "--preset", "tiny", "--out", str(out), "--eval-episodes", "0",
                    "--export", str(tmp_path / "exported"), "--iterations", "2")  # one more round: Ha's iterative
    assert again.returncode == 0, again.stderr[-3000:]
    assert "nothing to do" in again.stdout and again.stdout.count("skipping") == 4  # V, M, D and C of round 1
    assert all(os.path.getmtime(out / p) == t for p, t in mtimes.items())
    r2, first = out / "round2", collect.list_episodes(str(out / "data"))  # round 2: round 1's data and C's play
    new = collect.list_episodes(str(r2 / "data"))[len(first):]
    assert len(new) == 64 and all(os.path.samefile(a, b) for a, b in zip(first, collect.list_episodes(str(r2 / "data"))))
    for f in new[:8]:
        ep = collect.load_episode(f)
        assert ep["done"][-1] and not ep["done"][:-1].any() and set(np.unique(ep["action"])) <= set(range(5))
    assert vae.load_checkpoint(str(r2 / "vae.pt"))["made_from"]["init"] == vae.load_checkpoint(str(out / "vae.pt"))["id"]
    assert os.path.samefile(r2 / "danger.pt", out / "danger.pt") and "the agents' play " in again.stdout
    assert f"exported the agent of {r2} " in again.stdout
    summary = json.load(open(out / "summary.json"))  # from the tested first run, not the resume
    assert summary["collect_env_steps"] > 0 and summary["test"]["agent"]["episodes"] == 40
    assert summary["danger_env_steps"] == summary["hop_env_steps"] == 4096 and summary["env_steps"] == (
        summary["collect_env_steps"] + summary["hop_env_steps"] + summary["danger_env_steps"]
        + summary["controller_env_steps"])
    assert f"collection {summary['collect_env_steps']:,} " in again.stdout  # the resume still counts them
    for p in mtimes:  # float16 weights, no optimizer or CMA state: smaller, and the agent still loads
        assert os.path.getsize(tmp_path / "exported" / p) < os.path.getsize(r2 / p)
    assert evaluate.load_agent(str(tmp_path / "exported")).act(np.zeros((2, 64, 64, 3), np.uint8), np.ones(2, bool)).shape == (2,)
    refused = run_cli("train.py", "--preset", "tiny", "--out", str(out), "--eval-episodes", "0",
                      "--export", str(tmp_path / "exported"))
    assert refused.returncode != 0 and "exists" in refused.stderr.strip().splitlines()[-1]


# ---------------------------------------------------------------- the command line, modules alone, faults

def test_cli_booleans_help_and_choices(capsys):
    parse = lambda *argv: collect.cli(evaluate.EvalConfig, list(argv))  # noqa: E731
    assert parse("--json").json is True and parse("--json", "false").json is False
    assert parse("--json", "yes", "--pictures", "0").pictures is False and parse().json is False
    for bad in (["--json", "ture"], ["--distribution-mode", "medium"], ["--episodes", "many"]):
        with pytest.raises(SystemExit) as e:
            parse(*bad)
        assert e.value.code == 2 and bad[0] in capsys.readouterr().err  # argparse names the flag
    with pytest.raises(SystemExit):
        collect.cli(CConfig, ["--help"])
    out = " ".join(capsys.readouterr().out.split())  # --help, re-wrapped: every field's comment and default
    assert "C reads z, [z, h] (Ha's) or [z, h] + D's (d) or M's (m) logit (default: zhd)" in out
    assert "{z,zh,zhd,zhm}" in out and "--resume [BOOL]" in out


def test_module_defaults_are_the_pipelines():
    import train
    t = train.TrainConfig()
    assert (VAEConfig.z_dim, VAEConfig.spatial, VAEConfig.epochs) == (t.z_dim, t.spatial, t.vae_epochs)
    assert (MDNConfig.hidden, MDNConfig.gaussians, MDNConfig.epochs, MDNConfig.hop_steps, MDNConfig.hop_width,
            MDNConfig.hop_convs) == (t.hidden, t.gaussians, t.mdn_epochs, t.hop_steps, t.hop_width, t.hop_convs)
    assert (CConfig.generations, CConfig.inputs, CConfig.popsize, CConfig.levels) == (
        t.generations, t.inputs, t.popsize, t.levels)
    assert (CollectConfig.episodes, danger.DangerConfig.steps, danger.DangerConfig.epochs) == (
        t.episodes, t.danger_steps, t.danger_epochs)


@pytest.mark.parametrize("module", ["vae", "mdnrnn"])
def test_model_modules_work_copied_alone(tmp_path, module):
    """A student copies vae.py or mdnrnn.py into coursework: the model, loss and sampling must import."""
    shutil.copy(os.path.join(HERE, module + ".py"), tmp_path)
    code = {"vae": "import vae, torch; m = vae.ConvVAE(128, spatial=True); x = torch.rand(2, 3, 64, 64); "
                   "print(vae.vae_loss(x, *m(x), torch.ones(2, 1, 64, 64), 1.0, 0.5)[0].item() > 0)",
            "mdnrnn": "import mdnrnn, torch; m = mdnrnn.MDNRNN(4, 8, 2); mix, w, d, s = m.step(torch.zeros(3, 4), "
                      "torch.zeros(3)); z = mdnrnn.sample_next(*mix, w, d, 1.0)[0]; "
                      "print(mdnrnn.mdn_nll(*[t[:, 0] for t in mix], z).shape == (3,))"}[module]
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": ""})
    assert r.returncode == 0 and r.stdout.strip() == "True", r.stderr[-2000:]


class RunsCode:
    """An object whose unpickling would run code (here: create a file)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_checkpoints_with_pickled_objects_are_refused(tmp_path):
    marker, path = tmp_path / "was-unpickled", tmp_path / "evil.pt"
    torch.save(dict(config={}, model={}, payload=RunsCode(str(marker))), path)
    for load in (vae.load_checkpoint, vae.load_vae, danger.load_danger):
        with pytest.raises(SystemExit) as e:
            load(str(path))
        assert str(path) in str(e.value) and "not a checkpoint" in str(e.value) and "\n" not in str(e.value)
    assert not marker.exists()
    np.save(tmp_path / "x.npy", np.zeros(3))
    with pytest.raises(SystemExit):
        vae.load_checkpoint(str(tmp_path / "x.npy"))  # not a checkpoint at all


def killing_rollout(marker, always):
    """controller.rollout that SIGKILLs its own worker process (as the OOM killer would): the first
    time only, or always."""
    real = controller.rollout

    def rollout(*args, **kw):
        if always or not os.path.exists(marker):
            open(marker, "w").close()
            os.kill(os.getpid(), 9)
        return real(*args, **kw)
    return rollout


def test_a_killed_worker_is_replaced_and_the_run_stays_exact(tiny_run, tmp_path, monkeypatch, capsys):
    base = dict(vae=str(tiny_run / "vae.pt"), mdnrnn=str(tiny_run / "mdnrnn.pt"), inputs="zh", generations=2,
                popsize=4, levels=2, eval_every=1, eval_levels=2, workers=2)
    controller.train(CConfig(out=str(tmp_path / "straight.pt"), **base))
    monkeypatch.setattr(controller, "rollout", killing_rollout(str(tmp_path / "killed"), always=False))
    controller.train(CConfig(out=str(tmp_path / "killed.pt"), **base))  # the pool forks: workers get the patch
    assert "a fitness worker died in generation 1; replaying it" in capsys.readouterr().out
    a, b = (torch.load(tmp_path / f, weights_only=True) for f in ("straight.pt", "killed.pt"))
    assert torch.equal(a["params"], b["params"]) and a["env_steps"] == b["env_steps"]
    assert torch.equal(a["cma_x"], b["cma_x"]) and a["cma_x"].shape == (2, 4, 5 * (n_features("zh") + 1))


def test_workers_that_keep_dying_stop_the_run_with_one_line(tiny_run, tmp_path, monkeypatch):
    monkeypatch.setattr(controller, "rollout", killing_rollout(str(tmp_path / "killed"), always=True))
    cfg = CConfig(vae=str(tiny_run / "vae.pt"), mdnrnn=str(tiny_run / "mdnrnn.pt"), inputs="zh", generations=2,
                  popsize=4, levels=2, workers=2, out=str(tmp_path / "c.pt"))
    with pytest.raises(SystemExit) as e:
        controller.train(cfg)
    assert "workers died twice in generation 1" in str(e.value) and "--resume" in str(e.value)
    assert not os.path.exists(cfg.out)  # nothing half-written


TINY = {"collect.py": "--episodes 24 --num-envs 8", "vae.py": "--z-dim 64 --epochs 1 --batch-size 64",
        "mdnrnn.py": "--hidden 16 --gaussians 2 --epochs 1 --hop-steps 1024", "danger.py": "--steps 4096 --num-envs 32 --epochs 1",
        "controller.py": "--generations 1 --popsize 4 --levels 2 --eval-every 1 --eval-levels 2 --workers 1",
        "evaluate.py": "--episodes 8 --pictures false --death-steps 640"}


def test_the_readmes_stage_by_stage_commands_chain(tmp_path):
    """Each command of the README's "Running stage by stage" block, as printed there, on tiny sizes
    (flags appended: argparse keeps the last value) and in a temporary dir instead of runs/."""
    with open(os.path.join(HERE, "README.md")) as f:
        block = f.read().split("## Running stage by stage")[1].split("```bash\n")[1].split("```")[0]
    commands = [line.split("#")[0].split() for line in block.splitlines() if line.strip()]
    assert [c[1] for c in commands] == list(TINY)  # every stage, in the pipeline's order
    for python, script, *args in commands:
        assert python == "python"
        args = [a.replace("runs", str(tmp_path)) for a in args] + TINY[script].split()
        r = run_cli(script, *args)
        assert r.returncode == 0, (script, r.stderr[-3000:])
    result = json.loads(r.stdout.strip().splitlines()[-1])  # evaluate.py --json: the last line
    assert result["episodes"] == 8 and set(result["baselines"]) == {"random", "always_up"}


# ---------------------------------------------------------------- stale stages, resume, determinism

def copy_run(tiny_run, dest, *names):
    os.makedirs(dest, exist_ok=True)
    for name in names:
        (shutil.copytree if os.path.isdir(tiny_run / name) else shutil.copy)(tiny_run / name, dest / name)
    return dest


def test_a_collection_is_continued_only_with_its_own_flags(tiny_run, tmp_path):
    data = copy_run(tiny_run, tmp_path, "data") / "data"
    before = sorted(os.listdir(data))
    with pytest.raises(SystemExit) as e:
        collect_quiet(data, episodes=30, num_envs=8, up_prob=0.9)
    assert "--up-prob 0.9 conflicts with" in str(e.value) and "collect_config.json" in str(e.value)
    assert sorted(os.listdir(data)) == before  # nothing written
    collect_quiet(data, episodes=25, num_envs=8)  # more episodes of the same stream: fine
    assert len(glob.glob(str(data / "episode_*.npz"))) == 25


def test_stages_refuse_other_flags_and_changed_inputs(tiny_run, tmp_path):
    r = copy_run(tiny_run, tmp_path, "data", "vae.pt", "mdnrnn.pt", "latents", "controller.pt")
    v = dict(data=str(r / "data"), out=str(r / "vae.pt"), z_dim=8, spatial=False, batch_size=64, resume=True)
    m = dict(data=str(r / "data"), vae=str(r / "vae.pt"), out=str(r / "mdnrnn.pt"), hidden=16, gaussians=2,
             hop_steps=1024, resume=True)
    c = dict(vae=str(r / "vae.pt"), mdnrnn=str(r / "mdnrnn.pt"), out=str(r / "controller.pt"), inputs="zh", popsize=4,
             levels=2, eval_every=1, eval_levels=2, workers=1, resume=True)
    for train, cfg, flag in ((vae.train, VAEConfig(**{**v, "z_dim": 16}), "--z-dim 16"),
                             (mdnrnn.train, MDNConfig(**{**m, "gaussians": 3}), "--gaussians 3"),
                             (controller.train, CConfig(**{**c, "popsize": 6}), "--popsize 6")):
        with pytest.raises(SystemExit) as e:
            train(cfg)
        assert str(e.value).startswith(f"error: {r}") and f"other flags or inputs: {flag} (it has" in str(e.value)
        assert "\n" not in str(e.value)
    vae.train(VAEConfig(**v, epochs=2))  # V goes on (more epochs are allowed): M and C were made from the old V
    for train, cfg in ((mdnrnn.train, MDNConfig(**m, epochs=1)), (controller.train, CConfig(**c, generations=1))):
        with pytest.raises(SystemExit) as e:
            train(cfg)
        assert "other flags or inputs: vae (changed since)" in str(e.value)
    with pytest.raises(SystemExit) as e:  # a new M, but the latents on disk come from the old V
        mdnrnn.train(MDNConfig(**{**m, "out": str(r / "m2.pt"), "latents": str(r / "latents")}))
    assert "encoded by another V" in str(e.value)


def test_hop_head_trains_only_in_ms_first_hop_epochs(tiny_run, tmp_path):
    """--hop-epochs: the hop head learns in M's first epochs only (in hard mode 30 epochs memorise its moves); later
    epochs leave it exactly as it was, log no BCE for it (not a nan a reader takes for a diverged loss), and train
    the LSTM on."""
    m = dict(data=str(tiny_run / "data"), vae=str(tiny_run / "vae.pt"), latents=str(tmp_path / "latents"), hidden=16,
             gaussians=2, hop_steps=1024, hop_epochs=1)
    one = mdnrnn.train(MDNConfig(**m, out=str(tmp_path / "m1.pt"), epochs=1))
    three = mdnrnn.train(MDNConfig(**m, out=str(tmp_path / "m3.pt"), epochs=3))
    for k, t in one.hop.state_dict().items():
        assert torch.equal(t, three.hop.state_dict()[k]), k
    assert not torch.equal(one.lstm.weight_hh_l0, three.lstm.weight_hh_l0)
    rows = [json.loads(line) for line in open(tmp_path / "m3.jsonl")]
    assert np.isfinite(rows[0]["hop_bce"]) and all("hop_bce" not in r for r in rows[1:])


def test_hop_head_size_is_a_flag_and_travels_in_the_checkpoint(tmp_path):
    """--hop-width/--hop-convs shape M's hop head on V's grid (--preset no-d's larger head); the checkpoint keeps
    the size in its config, so load_mdnrnn rebuilds the same head and the same logits; a file from before the flags
    (a config without them) still loads, as the default head it was."""
    collect_quiet(tmp_path / "data", episodes=8, num_envs=8)
    vae.train(VAEConfig(data=str(tmp_path / "data"), out=str(tmp_path / "vae.pt"), z_dim=64, spatial=True, epochs=1,
                        batch_size=64))
    m = dict(data=str(tmp_path / "data"), vae=str(tmp_path / "vae.pt"), latents=str(tmp_path / "latents"), hidden=8,
             gaussians=1, epochs=1, hop_steps=512)
    big = mdnrnn.train(MDNConfig(**m, out=str(tmp_path / "big.pt"), hop_width=8, hop_convs=3))
    convs = [x for x in big.hop.net if isinstance(x, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(2 + 5, 8), (8, 8), (8, 8)]  # 1 channel a cell
    z, a = torch.randn(6, 64), torch.randint(0, 5, (6,))
    assert torch.equal(mdnrnn.load_mdnrnn(str(tmp_path / "big.pt")).hop(z, z.flip(0), a), big.hop(z, z.flip(0), a))
    mdnrnn.train(MDNConfig(**m, out=str(tmp_path / "old.pt")))
    ckpt = torch.load(tmp_path / "old.pt", weights_only=True)
    del ckpt["config"]["hop_width"], ckpt["config"]["hop_convs"]  # as M's stage wrote it before the flags
    torch.save(ckpt, tmp_path / "old.pt")
    old = mdnrnn.load_mdnrnn(str(tmp_path / "old.pt"))
    assert [c.out_channels for c in old.hop.net if isinstance(c, torch.nn.Conv2d)] == [32, 32]
    with pytest.raises(SystemExit) as e:
        MDNConfig(hop_convs=0)
    assert "--hop-convs 0" in str(e.value)


def test_load_agent_refuses_parts_not_trained_together(tmp_path):
    mixed = shutil.copytree(os.path.join(HERE, "pretrained", "hard"), tmp_path / "mixed")
    shutil.copy(os.path.join(HERE, "pretrained", "easy", "vae.pt"), mixed / "vae.pt")  # same sizes, other V
    with pytest.raises(SystemExit) as e:
        evaluate.load_agent(str(mixed))
    assert "was trained with another vae.pt" in str(e.value)


def test_train_refuses_a_changed_flag_on_an_existing_run(tmp_path):
    import train
    out = tmp_path / "run"
    os.makedirs(out)
    with open(out / "train_config.json", "w") as f:
        json.dump(dataclasses.asdict(train.parse_args(["--preset", "tiny", "--out", str(out)])), f)
    before = (out / "train_config.json").read_text()
    with pytest.raises(SystemExit) as e:
        train.run(train.parse_args(["--preset", "tiny", "--out", str(out), "--z-dim", "128"]))
    assert "--z-dim 128 conflicts with" in str(e.value) and "made with 64" in str(e.value)
    assert (out / "train_config.json").read_text() == before and os.listdir(out) == ["train_config.json"]


@pytest.mark.parametrize("argv", [["--episodes", "0"], ["--z-dim", "100"], ["--sigma0", "0"], ["--popsize", "1"],
                                  ["--inputs", "zhd", "--danger-steps", "0"], ["--spatial", "ture"],
                                  ["--temperature", "0"], ["--temperature", "-1"], ["--device", "tpu"],
                                  ["--pool", "dask"],
                                  ["--controller-env", "dream", "--inputs", "zhd", "--danger-steps", "100"],
                                  ["--inputs", "zhm", "--hop-steps", "0", "--danger-steps", "0"], ["--hop-steps", "-1"],
                                  ["--controller-env", "dream", "--inputs", "zhm", "--danger-steps", "0"]])
def test_bad_flag_values_get_one_line_before_anything_is_written(tmp_path, argv, capsys):
    import train
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--out", str(tmp_path / "r"), *argv])
    message = str(e.value) if e.value.code != 2 else capsys.readouterr().err.strip().splitlines()[-1]
    assert argv[0] in message and not os.path.exists(tmp_path / "r")


def test_d_resumes_exactly(tmp_path):
    cfg = dict(steps=2048, num_envs=32, seed=3)
    danger.train(danger.DangerConfig(out=str(tmp_path / "a.pt"), epochs=1, **cfg))
    danger.train(danger.DangerConfig(out=str(tmp_path / "a.pt"), epochs=2, resume=True, **cfg))
    danger.train(danger.DangerConfig(out=str(tmp_path / "b.pt"), epochs=2, **cfg))
    a, b = (torch.load(tmp_path / f, weights_only=True) for f in ("a.pt", "b.pt"))
    assert a["epoch"] == b["epoch"] == 2 and a["id"] == b["id"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_a_non_finite_loss_stops_v_and_keeps_the_last_good_checkpoint(tiny_run, tmp_path, monkeypatch):
    r = copy_run(tiny_run, tmp_path, "data", "vae.pt")
    before = (r / "vae.pt").read_bytes()
    real = vae.vae_loss
    monkeypatch.setattr(vae, "vae_loss", lambda *a: (real(*a)[0] * float("nan"), *real(*a)[1:]))
    with pytest.raises(SystemExit) as e:
        vae.train(VAEConfig(data=str(r / "data"), out=str(r / "vae.pt"), z_dim=8, spatial=False, batch_size=64,
                            epochs=2, resume=True))
    assert "V's loss is nan at epoch 2, step" in str(e.value) and "(epoch 1)" in str(e.value)
    assert (r / "vae.pt").read_bytes() == before


def tiny_pipeline(out, seed):
    """Every stage on tiny sizes, in-process; returns the tensors of V, M, D and C and the data's bytes."""
    collect_quiet(out / "data", seed=seed)
    vae.train(VAEConfig(data=str(out / "data"), out=str(out / "vae.pt"), z_dim=8, spatial=False, epochs=1,
                        batch_size=64, seed=seed))
    mdnrnn.train(MDNConfig(data=str(out / "data"), vae=str(out / "vae.pt"), out=str(out / "mdnrnn.pt"), hidden=16,
                           gaussians=2, epochs=1, hop_steps=1024, seed=seed))
    danger.train(danger.DangerConfig(out=str(out / "danger.pt"), steps=2048, num_envs=32, epochs=1, seed=seed))
    controller.train(CConfig(vae=str(out / "vae.pt"), mdnrnn=str(out / "mdnrnn.pt"), danger=str(out / "danger.pt"),
                             out=str(out / "controller.pt"), popsize=4, generations=6, levels=2, eval_every=3,
                             eval_levels=2, workers=1, seed=seed))  # 6 generations: the default 30 cost 3x the rest
    ckpts = {n: torch.load(out / f"{n}.pt", weights_only=True) for n in ("vae", "mdnrnn", "danger", "controller")}
    tensors = {f"{n}.{k}": t for n, c in ckpts.items() for k, t in c.get("model", {k: c[k] for k in ("params", "cma_x")
                                                                                    if k in c}).items()}
    data = b"".join((out / "data" / f).read_bytes() for f in sorted(os.listdir(out / "data")) if f.endswith(".npz"))
    return tensors, data


def test_same_seed_same_result_bit_for_bit(tmp_path, one_torch_thread):
    a, data_a = tiny_pipeline(tmp_path / "a", seed=0)
    b, data_b = tiny_pipeline(tmp_path / "b", seed=0)
    c, data_c = tiny_pipeline(tmp_path / "c", seed=1)
    assert data_a == data_b and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # (C's kept params may be its start point in both: CMA-ES's candidates differ)
    assert data_a != data_c and not any(torch.equal(a[k], c[k]) for k in ("vae.fc.weight", "controller.cma_x"))


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MB filesystem (tmpfs; needs root, as here and in CI), skipped where it cannot be mounted."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here")
    yield mnt
    subprocess.run(["umount", str(mnt)])


def test_a_full_disk_during_collection_leaves_whole_episodes_and_one_line(small_disk):
    r = run_cli("collect.py", "--out", str(small_disk / "data"), "--episodes", "400", "--num-envs", "16")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith("error: the disk is full (writing ")
    episodes = collect.list_episodes(str(small_disk / "data"))
    assert 0 < len(episodes) < 400
    for path in episodes:  # every episode that carries a final name is whole
        collect.load_episode(path)


def test_a_full_disk_keeps_the_last_good_checkpoint(small_disk):
    path = str(small_disk / "c.pt")
    vae.save_atomic(dict(config={}, x=torch.zeros(150_000)), path)  # 600 KB
    with pytest.raises(OSError) as e:
        vae.save_atomic(dict(config={}, x=torch.ones(400_000)), path)  # 1.6 MB more does not fit in 2 MB
    assert e.value.errno == errno.ENOSPC and torch.equal(vae.load_checkpoint(path)["x"], torch.zeros(150_000))
    with pytest.raises(SystemExit) as e:  # what a user sees: one line, how to go on
        collect.interruptible(lambda cfg: vae.save_atomic(dict(config={}, x=torch.ones(400_000)), path), None)
    assert str(e.value).startswith("error: the disk is full (writing ") and "\n" not in str(e.value)


def test_a_checkpoint_saved_from_cuda_tensors_resumes_on_cpu(tiny_run, tmp_path, monkeypatch):
    r = copy_run(tiny_run, tmp_path, "data")
    ckpt = torch.load(tiny_run / "vae.pt", weights_only=True)
    monkeypatch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")  # as if saved on a GPU
    torch.save(ckpt, r / "vae.pt")
    monkeypatch.undo()
    with pytest.raises(RuntimeError):  # a plain torch.load on a machine without CUDA
        torch.load(r / "vae.pt", weights_only=True)
    model = vae.train(VAEConfig(data=str(r / "data"), out=str(r / "vae.pt"), z_dim=8, spatial=False, batch_size=64,
                                epochs=2, resume=True))  # resumes: weights and Adam's state land on the CPU
    assert torch.load(r / "vae.pt", weights_only=True)["epoch"] == 2 and next(model.parameters()).device.type == "cpu"


def test_a_corrupt_latent_file_gets_one_line(tiny_run, tmp_path):
    r = copy_run(tiny_run, tmp_path, "data", "vae.pt", "latents")
    first = sorted((r / "latents").iterdir())[0]
    first.write_bytes(first.read_bytes()[:100])  # truncated
    cfg = MDNConfig(data=str(r / "data"), vae=str(r / "vae.pt"), out=str(r / "m.pt"), hidden=16, gaussians=2,
                    hop_steps=0)
    with pytest.raises(SystemExit) as e:
        mdnrnn.train(cfg)
    assert str(e.value).startswith(f"error: {first}: not a readable encoded episode") and "\n" not in str(e.value)
