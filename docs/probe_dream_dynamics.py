"""Probe: does M's dream move the frog when C presses UP? M's open-loop prediction beside the real game.

On the same held-out levels the real game is played twice, hop-then-wait (UP every --hop-every steps, NONE
between) and always-NONE, and V encodes both; the frames differ only by what UP did (the frog). M, fed the
first real z and then only its own predictions (its point estimate, no sampling: the dream at tau -> 0),
plays the hop-then-wait actions. For each step t it prints how often M's z is closer to the real hop
trajectory than to the real wait one (0.5: M cannot tell UP from NONE; below: M dreams the frog standing
still), M's squared error, and the error of "nothing moves" (the first z copied). It also prints V's
posterior variance (the noise Ha's z resampling puts into M's training inputs and targets) beside the mean
frame-to-frame change of z and the change UP makes. Steps after either episode ended are left out.

--transition conv asks the same of a model that is not M: a deterministic conv net on V's 8x8 grid, trained here
on the run's encoded episodes, whose 3x3 convs apply one local rule wherever the frog is.

    python docs/probe_dream_dynamics.py --run runs --episodes 256 [--transition conv]
"""
import os
import sys
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo's modules
from collect import ACTIONS, NONE, UP, check_flags, cli, fail, make_env  # noqa: E402
from mdnrnn import load_mdnrnn, read_latents  # noqa: E402
from vae import load_vae, to_input  # noqa: E402


@dataclass
class ProbeConfig:
    run: str = "runs"  # directory holding vae.pt and mdnrnn.pt
    distribution_mode: Literal["easy", "hard"] = "easy"  # procgen difficulty of the levels
    episodes: int = 256  # held-out levels
    steps: int = 24  # steps of each trajectory
    hop_every: int = 6  # UP at t = 0, hop_every, 2 hop_every, ...; NONE between
    point: Literal["mean", "mode"] = "mean"  # M's point estimate: the mixture's mean, or its likeliest component's
    seed: int = 1_000_003  # level stream (evaluate.py's held-out one)
    transition: Literal["m", "conv"] = "m"  # whose open loop: the run's M, or a ConvTransition trained on its latents/
    conv_steps: int = 6000  # --transition conv: gradient steps, 256 transitions each

    def __post_init__(self):
        check_flags(self, at_least=dict(episodes=1, steps=1, hop_every=1, conv_steps=1))


@torch.no_grad()
def real_latents(vae, cfg, actions):
    """V's mu of a real trajectory under fixed actions (T,) on cfg.episodes levels: -> (T+1,N,Z), (T+1,N) whether
    the episode is still the first one (CRUCIAL: procgen auto-resets; after a done it is another level), and V's
    posterior variance summed over z, averaged over the first frames."""
    env, zs, alive, ok = make_env(cfg.episodes, cfg.distribution_mode, seed=cfg.seed), [], True, []
    for t in range(len(actions) + 1):
        _, obs, first = env.observe()
        alive = alive & ~first if t else np.ones(cfg.episodes, bool)
        ok.append(alive)
        mu, logvar = vae.encode(to_input(obs["rgb"]))  # (N,Z) each
        zs.append(mu)
        noise = logvar.exp().sum(-1).mean().item() if t == 0 else noise
        if t < len(actions):
            env.act(np.full(cfg.episodes, ACTIONS[actions[t]]))
    return torch.stack(zs), torch.from_numpy(np.stack(ok)), noise


@torch.no_grad()
def open_loop(mdn, z0, actions, point="mean"):
    """M fed its own point estimates from z0 (N,Z) under fixed actions (T,): -> (T+1,N,Z), z0 first."""
    z, state, out = z0, None, [z0]
    for a in actions:
        (logit_pi, mu, _), _, _, state = mdn.step(z, torch.full((len(z),), int(a)), state)  # (N,1,Z,K) each
        logit_pi, mu = logit_pi[:, 0], mu[:, 0]  # (N,Z,K)
        z = (logit_pi.softmax(-1) * mu).sum(-1) if point == "mean" else \
            mu.gather(-1, logit_pi.argmax(-1, keepdim=True))[..., 0]  # (N,Z)
        out.append(z)
    return torch.stack(out)


class ConvTransition(nn.Module):
    """Not M: z_{t+1} = z_t + a conv net of (z_t, z_{t-1}, the action as 5 planes) on V's 8x8 grid of z_dim/64
    channels. Its 3x3 convs share one local rule over the grid ("UP moves the frog up"), which an LSTM on the
    flattened z must learn for each of the 64 cells apart."""

    def __init__(self, c, width=64, n_actions=5, out=0, extra=0):
        super().__init__()
        self.c, self.n_actions, self.out = c, n_actions, out  # out > 0: return the last conv's out raw planes
        self.net = nn.Sequential(  # (N,2c+A+E,8,8) -> (N,c,8,8): the change of z
            nn.Conv2d(2 * c + n_actions + extra, width, 3, 1, 1), nn.ReLU(), nn.Conv2d(width, width, 3, 1, 1),
            nn.ReLU(), nn.Conv2d(width, width, 3, 1, 1), nn.ReLU(), nn.Conv2d(width, out or c, 3, 1, 1))

    def forward(self, z, z_last, a, extra=None):
        """z, z_last (N,Z), action indices (N,), with extra its planes (N,E,8,8) -> the next z (N,Z), or with out the
        raw planes (N,out,8,8)."""
        n, planes = len(z), F.one_hot(a, self.n_actions).float()[..., None, None].expand(-1, -1, 8, 8)  # (N,A,8,8)
        x = torch.cat([z.view(n, self.c, 8, 8), z_last.view(n, self.c, 8, 8), planes, *(
            () if extra is None else (extra,))], 1)  # (N,2c+A+E,8,8)
        y = self.net(x)
        return y if self.out else z + y.reshape(n, -1)  # (N,c,8,8) -> (N,Z)


def train_conv(latents, steps, width=64, holdout=20, batch=256, seed=0):
    """A ConvTransition fitted by squared error to V's mu of the run's encoded episodes (mdnrnn.py's latents/;
    episodes 0, holdout, 2 holdout, ... left out, about as many as M leaves out, not the same ones; the probe's
    levels are held out from both anyway): mu[t-1], mu[t], action[t] -> mu[t+1]."""
    torch.manual_seed(seed)
    rng, Z, A = np.random.default_rng(seed), [], []
    names = sorted(f for f in os.listdir(latents) if f.endswith(".npz")) if os.path.isdir(latents) else []
    if len(names) < 2:
        fail(f"{latents}: expected the run's episodes encoded by mdnrnn.py (.npz files), found {len(names)}")
    for i, name in enumerate(names):
        if i % holdout:
            ep = read_latents(os.path.join(latents, name), ("mu", "action"))
            Z.append(torch.from_numpy(ep["mu"].astype(np.float32)))  # (T,Z): mu of the frame action t was chosen on
            A.append(torch.from_numpy(ep["action"].astype(np.int64)))  # (T,)
    idx = np.array([(e, t) for e in range(len(Z)) for t in range(1, len(A[e]) - 1)])  # (n,2): episode, step
    model = ConvTransition(Z[0].shape[1] // 64, width)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    for step in range(steps):
        b = idx[rng.integers(0, len(idx), batch)]
        z, z_last, z_next = (torch.stack([Z[e][t + k] for e, t in b]) for k in (0, -1, 1))  # (B,Z) each
        loss = (model(z, z_last, torch.stack([A[e][t] for e, t in b])) - z_next).pow(2).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % 1000 == 0 or step + 1 == steps:
            print(f"conv transition step {step + 1}: squared error {loss.item():.2f}, of copying z_t "
                  f"{(z - z_next).pow(2).sum(-1).mean().item():.2f}", flush=True)
    return model.eval()


@torch.no_grad()
def open_loop_conv(model, z0, actions):
    """The ConvTransition fed its own predictions from z0 (N,Z) under fixed actions (T,): -> (T+1,N,Z)."""
    z, z_last, out = z0, z0, [z0]  # the first step has no earlier frame: z0 stands in
    for a in actions:
        z, z_last = model(z, z_last, torch.full((len(z),), int(a))), z
        out.append(z)
    return torch.stack(out)


def main(cfg):
    vae = load_vae(os.path.join(cfg.run, "vae.pt"))
    if cfg.transition == "conv" and not vae.spatial:
        fail(f"--transition conv: {cfg.run}/vae.pt has a flat z; the conv transition reads V's 8x8 grid (--spatial)")
    hop = np.array([UP if t % cfg.hop_every == 0 else NONE for t in range(cfg.steps)])
    z_hop, ok_hop, noise = real_latents(vae, cfg, hop)
    z_wait, ok_wait, _ = real_latents(vae, cfg, np.full(cfg.steps, NONE))
    if cfg.transition == "m":
        dream = open_loop(load_mdnrnn(os.path.join(cfg.run, "mdnrnn.pt")), z_hop[0], hop, cfg.point)  # (T+1,N,Z)
    else:
        dream = open_loop_conv(train_conv(os.path.join(cfg.run, "latents"), cfg.conv_steps), z_hop[0], hop)
    sq = lambda a, b: (a - b).pow(2).sum(-1)  # (T+1,N)
    e_hop, e_wait, up_effect = sq(dream, z_hop), sq(dream, z_wait), sq(z_hop, z_wait)
    keep = ok_hop & ok_wait & (up_effect > 0)  # (T+1,N): both still on the first level, and UP changed the frame
    step = sq(z_wait[1:], z_wait[:-1])[ok_wait[1:]].mean().item()
    who = f"M's {cfg.point}" if cfg.transition == "m" else "the conv transition"
    print(f"{cfg.run}: {cfg.episodes} {cfg.distribution_mode} levels, UP every {cfg.hop_every} steps, {who}")
    print(f"V's posterior variance (summed over z, first frames): {noise:.1f}; mean change of z per step (waiting): {step:.1f}")
    print(f"{'t':>3} {'levels':>6} {'closer to hop':>13} {'M error':>8} {'copy error':>10} {'UP effect':>9}")
    rows = []
    for t in range(1, cfg.steps + 1):
        k = keep[t]
        if k.any():
            rows.append(dict(t=t, levels=int(k.sum()), closer=(e_hop[t] < e_wait[t])[k].float().mean().item(),
                             m_error=e_hop[t][k].mean().item(), copy_error=sq(z_hop[0], z_hop[t])[k].mean().item(),
                             up_effect=up_effect[t][k].mean().item()))
            r = rows[-1]
            print(f"{t:>3} {r['levels']:>6} {r['closer']:>13.2f} {r['m_error']:>8.1f} {r['copy_error']:>10.1f} "
                  f"{r['up_effect']:>9.1f}")
    return dict(noise=noise, step=step, rows=rows)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(cli(ProbeConfig))
