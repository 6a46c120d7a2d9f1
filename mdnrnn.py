"""M: the memory model of World Models (Ha & Schmidhuber 2018, section 2.2 and appendix A.2), an LSTM whose
output layer is a mixture density network: given z_t and action a_t it predicts P(z_{t+1}) as K Gaussians per
latent dimension, and the logits of "this step wins" (leaper's only reward) and "this step kills the frog" (the
episode ends without the win before the 500-step cap). Its hop head (danger.HopHead, trained here on hop-then-wait
play) tells from V's z of two frames whether a move kills. Run on its own samples, M is a dream (`dream`, section 4).
Model, loss, sampling and dream need only torch (copy this file); encoding and training borrow vae.py, collect.py.

    python mdnrnn.py --data runs/data --vae runs/vae.pt --out runs/mdnrnn.pt   # encodes --data with V, then trains
"""
import dataclasses
import json
import math
import os
import time
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

LOG_SIGMA_MIN, LOG_SIGMA_MAX = -5.0, 2.0  # sigma in [0.007, 7.4]: the density cannot blow up


@dataclasses.dataclass
class MDNConfig:
    data: str = "runs/data"  # episodes written by collect.py
    vae: str = "runs/vae.pt"  # trained V, used to encode the episodes
    latents: str = ""  # where the encoded episodes go (default: a latents/ dir beside --out)
    out: str = "runs/mdnrnn.pt"  # checkpoint; a .jsonl log goes beside it
    hidden: int = 256  # LSTM units (Ha: 256 for CarRacing)
    gaussians: int = 5  # mixture components per latent dimension (Ha: 5)
    seq_len: int = 32  # training sequences are cut to this many steps (shorter ones are padded)
    batch_size: int = 64  # sequences per gradient step
    epochs: int = 30  # passes over the training sequences (held-out NLL 44.5 at 10, 32.4 at 30: default easy data)
    lr: float = 1e-3  # Adam learning rate
    grad_clip: float = 1.0  # gradient norm clipping
    hop_steps: int = 400_000  # env steps of hop-then-wait play (danger.py) that M's hop head learns from (0: none)
    hop_epochs: int = 10  # passes of the hop head over those moves, in M's first epochs (hard: 30 memorise them)
    hop_width: int = 32  # channels of the hop head's 3x3 convs on V's grid (train.py --preset no-d: 64)
    hop_convs: int = 2  # the hop head's 3x3 convs (train.py --preset no-d: 3; a wider view of the cars)
    distribution_mode: Literal["easy", "hard"] = "easy"  # procgen difficulty of that play
    holdout: int = 20  # every holdout-th episode is kept out of training, for the test numbers
    seed: int = 0  # seeds torch and the shuffling
    resume: bool = False  # continue from --out instead of refusing to overwrite it
    device: Literal["auto", "cpu", "cuda"] = "auto"  # where to train (auto: the GPU if torch sees one)

    def __post_init__(self):  # every flag is checked before anything is written: one error line
        from collect import check_flags  # the training config, not the model: it may borrow
        from vae import pick_device
        pick_device(self.device)
        check_flags(self, above=dict(lr=0, grad_clip=0), at_least=dict(hidden=1, gaussians=1, seq_len=1, batch_size=1,
                    epochs=1, holdout=0, hop_steps=0, hop_epochs=1, hop_width=1, hop_convs=1))


class MDNRNN(nn.Module):
    def __init__(self, z_dim=32, hidden=256, gaussians=5, n_actions=5, hop=None):  # 5: leaper's actions
        super().__init__()
        self.z_dim, self.hidden, self.k, self.n_actions = z_dim, hidden, gaussians, n_actions
        self.lstm = nn.LSTM(z_dim + n_actions, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 3 * z_dim * gaussians + 2)  # pi, mu, log sigma; win, death
        self.hop = hop  # "does this move kill?" (danger.HopHead, on V's z), or None: learnt from hop-then-wait play

    def forward(self, z, action, state=None):
        """z (B,T,Z), action indices (B,T) -> mixture params for z_{t+1}, each (B,T,Z,K), the win and
        death logits (B,T), and the LSTM state (h, c), each (1,B,H)."""
        out, state = self.lstm(self.lstm_input(z, action), state)  # (B,T,H)
        y = self.head(out)  # (B,T,3*Z*K+2)
        mix = y[..., :-2].reshape(*y.shape[:2], 3, self.z_dim, self.k)  # (B,T,3,Z,K)
        log_sigma = LOG_SIGMA_MIN + (LOG_SIGMA_MAX - LOG_SIGMA_MIN) * torch.sigmoid(mix[:, :, 2])
        return (mix[:, :, 0], mix[:, :, 1], log_sigma), y[..., -2], y[..., -1], state

    def lstm_input(self, z, action):
        return torch.cat([z, F.one_hot(action.long(), self.n_actions).float()], -1)  # (B,T,Z+A)

    def step(self, z, action, state=None):
        """One step for a batch: z (B,Z), action (B,) -> outputs of forward(), each with T=1."""
        return self.forward(z[:, None], action[:, None], state)

    def advance(self, z, action, state=None):
        """Only the new LSTM state (h, c), each (1,B,H): all the controller needs, no MDN head."""
        return self.lstm(self.lstm_input(z[:, None], action[:, None]), state)[1]


def mdn_nll(logit_pi, mu, log_sigma, target):
    """-log P(target) under the mixture, summed over latent dims: (...,Z,K) x3, (...,Z) -> (...). In log space
    (logsumexp: a sum of probabilities underflows). A density can exceed 1: a NEGATIVE NLL means a sharp M."""
    log_normal = (-0.5 * ((target.unsqueeze(-1) - mu) / log_sigma.exp()).pow(2)
                  - log_sigma - 0.5 * math.log(2 * math.pi))  # (...,Z,K)
    return -torch.logsumexp(F.log_softmax(logit_pi, -1) + log_normal, -1).sum(-1)


def masked_bce(logit, target, mask):
    """Binary cross-entropy averaged over the steps where mask is 1 (not padding): (B,L) x3 -> ()."""
    return F.binary_cross_entropy_with_logits(logit, target, weight=mask, reduction="sum") / mask.sum()


def m_losses(model, batch, sample=True):
    """Mean losses over a batch's unpadded steps (load_sequences' dict): nll per step, win and death BCE, death logits."""
    mu, logvar = batch["mu"].float(), batch["logvar"].float()  # (B,L+1,Z) each; stored in float16
    z = mu + torch.randn_like(mu) * (0.5 * logvar).exp() if sample else mu  # (B,L+1,Z); Ha resamples z
    mix, win_logit, death_logit, _ = model(z[:, :-1], batch["action"])
    nll = (mdn_nll(*mix, z[:, 1:]) * batch["next_mask"]).sum() / batch["next_mask"].sum().clamp(min=1)
    win_bce = masked_bce(win_logit, batch["win"], batch["step_mask"])
    death_bce = masked_bce(death_logit, batch["death"], batch["step_mask"])
    return nll, win_bce, death_bce, death_logit


@torch.no_grad()
def sample_next(logit_pi, mu, log_sigma, win_logit, death_logit, tau=1.0):
    """Sample z_{t+1} (B,Z), a win (B,) and a death (B,) from M's outputs for one step (each (B,1,...)).
    Temperature tau (Ha): the mixture logits are divided by tau, the std scaled by sqrt(tau). Each dim's component
    is drawn by the inverse of its unnormalised CDF (2x a Categorical's speed, whose softmax over K = 5 is slow)."""
    logit_pi, mu, log_sigma = logit_pi[:, 0], mu[:, 0], log_sigma[:, 0]  # (B,Z,K)
    cdf = ((logit_pi - logit_pi.amax(-1, keepdim=True)) / max(tau, 1e-6)).exp().cumsum(-1)  # (B,Z,K)
    k = (cdf < (1 - torch.rand(*cdf.shape[:-1], 1)) * cdf[..., -1:]).sum(-1).clamp(max=cdf.shape[-1] - 1)  # (B,Z)
    pick = lambda t: t.gather(-1, k.unsqueeze(-1)).squeeze(-1)  # (B,Z)
    z = pick(mu) + pick(log_sigma).exp() * math.sqrt(tau) * torch.randn(k.shape)
    return z, torch.bernoulli(torch.sigmoid(win_logit[:, 0])), torch.bernoulli(torch.sigmoid(death_logit[:, 0]))


@torch.no_grad()
def dream(model, policy, z, tau=1.0, max_steps=500):
    """M's dream as an environment (Ha & Schmidhuber, section 4), for a batch of N episodes at once: from V's z of
    real first frames (N,Z), policy(z (n,Z), h (n,H), idx (n,)) -> action indices (n,) plays the episodes still going
    (idx: which); M samples each next z, a win and a death at temperature tau. An episode ends at a sampled death or
    win, or at max_steps (leaper's cap). No convolution. -> returns (N,) (10 per win, as leaper pays), lengths (N,)."""
    n, z = len(z), z.clone()
    h, c = torch.zeros(2, 1, n, model.hidden).unbind()  # M's memory, each (1,N,H)
    ret, length, alive = torch.zeros(n), torch.zeros(n, dtype=torch.long), torch.ones(n, dtype=torch.bool)
    for _ in range(max_steps):
        idx = alive.nonzero()[:, 0]  # (n,) the episodes still going
        a = policy(z[idx], h[0, idx], idx)  # (n,) action indices
        mix, win_logit, death_logit, (h[:, idx], c[:, idx]) = model.step(z[idx], a, (h[:, idx], c[:, idx]))
        z[idx], win, death = sample_next(*mix, win_logit, death_logit, tau)  # (n,Z), (n,), (n,)
        ret[idx], length[idx] = ret[idx] + 10 * win, length[idx] + 1
        alive[idx] = (win == 0) & (death == 0)
        if not alive.any():
            break
    return ret, length


def read_latents(path, keys, optional=False):
    """The named arrays of one encoded episode (optional: only those it has); a corrupt one gets one error line."""
    from collect import fail
    try:
        with np.load(path) as d:
            return {k: d[k] for k in keys if k in d.files or not optional}
    except Exception as e:  # a truncated or corrupt file: OSError, ValueError, EOFError, BadZipFile...
        fail(f"{path}: not a readable encoded episode ({type(e).__name__}); delete it and run again to re-encode it")


def encode_episodes(data, vae_path, latents):
    """Encode every episode of `data` with V into `latents` (one .npz each: mu, logvar float16 and
    the episode's action, reward, done). Resumable: episodes already encoded are skipped."""
    from collect import fail, list_episodes, load_episode
    from vae import encode, load_vae
    vae = load_vae(vae_path)
    os.makedirs(latents, exist_ok=True)
    done = sorted(f for f in os.listdir(latents) if f.endswith(".npz"))
    if done and str(read_latents(os.path.join(latents, done[0]), ("vae_id",), True).get("vae_id", "")) != vae.id:
        fail(f"{latents}: encoded by another V than {vae_path}: use another --latents (or --out)")
    todo = [p for p in list_episodes(data) if not os.path.exists(os.path.join(latents, os.path.basename(p)))]
    t0, n = time.time(), 0
    for path in tqdm(todo, desc="encode", unit="ep", disable=None):
        ep = load_episode(path)
        mu, logvar = encode(vae, ep["obs"])
        target = os.path.join(latents, os.path.basename(path))
        np.savez(target + ".tmp.npz", mu=mu.astype(np.float16), logvar=logvar.astype(np.float16),
                 action=ep["action"], reward=ep["reward"], done=ep["done"], vae_id=np.array(vae.id))
        os.replace(target + ".tmp.npz", target)
        n += len(mu)
    if todo:
        print(f"encode: {len(todo)} episodes, {n} frames, {n / (time.time() - t0):,.0f} frames/s")


def load_sequences(latents, seq_len, holdout):
    """Cut the encoded episodes into windows of seq_len steps (+1 frame for the last target), padded.
    Returns a dict of tensors, one row per window, and a held-out flag per window (N,):
      mu, logvar (N,L+1,Z) float16: V's encoding of the frames; action (N,L): index 0..4 taken at step t;
      win (N,L): 1 where step t reached the finish (reward 10); death (N,L): 1 where step t killed the frog
      (its episode's last step, without the win, before the 500-step cap); step_mask (N,L): step t is real, not padding;
      next_mask (N,L): z_{t+1} exists (not after the episode's last step)."""
    from collect import MAX_STEPS, fail
    pad = lambda x, length: np.pad(x, [(0, length - len(x))] + [(0, 0)] * (x.ndim - 1))  # zeros along axis 0
    if not (files := sorted(f for f in os.listdir(latents) if f.endswith(".npz"))):
        fail(f"{latents}: no encoded episodes")
    cols, held = {k: [] for k in ("mu", "logvar", "action", "win", "death", "step_mask", "next_mask")}, []
    for k, name in enumerate(files):
        ep = read_latents(os.path.join(latents, name), ("mu", "logvar", "action", "reward", "done"))
        T = len(ep["action"])  # CRUCIAL: done also ends a win and the 500-step cap; death is only the rest
        death = (np.arange(T) == T - 1) & ep["done"][-1] & (ep["reward"].sum() <= 0) & (T < MAX_STEPS)  # (T,)
        for s in range(0, T, seq_len):
            n, f = min(seq_len, T - s), min(seq_len + 1, T - s)  # steps, frames (one more if the episode goes on)
            cols["mu"].append(pad(ep["mu"][s:s + f], seq_len + 1))  # float16 as stored: half the RAM
            cols["logvar"].append(pad(ep["logvar"][s:s + f], seq_len + 1))
            cols["action"].append(pad(ep["action"][s:s + n].astype(np.int64), seq_len))
            cols["win"].append(pad((ep["reward"][s:s + n] > 0).astype(np.float32), seq_len))  # win = reward 10
            cols["death"].append(pad(death[s:s + n].astype(np.float32), seq_len))
            cols["step_mask"].append((np.arange(seq_len) < n).astype(np.float32))
            cols["next_mask"].append((np.arange(seq_len) < f - 1).astype(np.float32))
            held.append(holdout > 0 and k % holdout == holdout - 1)
    return {k: torch.from_numpy(np.stack(c)) for k, c in cols.items()}, np.array(held)


@torch.no_grad()
def test_metrics(model, data, batch_size=256):
    """Held-out NLL (z from mu, no resampling), win and death BCE, and the AUC of the death logit over all steps."""
    from danger import auc
    model.eval()
    dev, sums, logits = next(model.parameters()).device, np.zeros(3), []
    for i in range(0, len(data["action"]), batch_size):  # in batches: the paper preset's at once took ~8 GB
        batch = {k: t[i:i + batch_size].to(dev) for k, t in data.items()}
        nll, win_bce, death_bce, death_logit = m_losses(model, batch, sample=False)
        steps, nexts = batch["step_mask"].sum().item(), batch["next_mask"].sum().item()
        sums += [nll.item() * nexts, win_bce.item() * steps, death_bce.item() * steps]  # means back to sums
        logits.append(death_logit.cpu())
    mask = data["step_mask"].bool()  # (N,L)
    nll, win_bce, death_bce = sums / [max(data["next_mask"].sum().item(), 1), mask.sum().item(), mask.sum().item()]
    return dict(test_nll=nll, test_win_bce=win_bce, test_death_bce=death_bce,
                test_death_auc=auc(torch.cat(logits)[mask].numpy(), data["death"][mask].numpy()))




def train(cfg):
    from collect import fail
    from danger import HopHead, hop_auc, hop_env_steps, hop_epoch, hop_set
    from vae import identity, load_checkpoint, resume_point, save_atomic, start_training
    vae_id, grid = (v := load_checkpoint(cfg.vae)).get("id", ""), v["config"].get("spatial", False)  # V's 8x8 cells?
    ckpt = resume_point(cfg, made_from=dict(vae=vae_id))
    if ckpt and ckpt["epoch"] >= cfg.epochs:
        print(f"M: {cfg.out} already has {cfg.epochs} epochs, skipping")
        return load_mdnrnn(cfg.out)
    os.makedirs(os.path.dirname(os.path.abspath(cfg.out)), exist_ok=True)
    latents = cfg.latents or os.path.join(os.path.dirname(os.path.abspath(cfg.out)), "latents")
    encode_episodes(cfg.data, cfg.vae, latents)
    torch.manual_seed(cfg.seed)  # seeding, in one place: weights, z resampling and shuffling
    data, held = load_sequences(latents, cfg.seq_len, cfg.holdout)
    train_idx = torch.from_numpy(np.flatnonzero(~held))  # batches index `data`: no copy of the training set
    test_set = {k: t[held] for k, t in data.items()} if held.any() else data
    z_dim, n_train, config = data["mu"].shape[-1], len(train_idx), dataclasses.asdict(cfg)
    hop, hop_idx, hop_test = hop_set(cfg)  # danger.py: hop-then-wait play, as V sees it
    head = HopHead(z_dim, grid, width=cfg.hop_width, convs=cfg.hop_convs) if cfg.hop_steps else None  # size: config
    m = MDNRNN(z_dim, cfg.hidden, cfg.gaussians, hop=head)
    model, opt, epoch, step, dev = start_training(m, cfg.lr, ckpt, cfg.device)
    print(f"M: {sum(p.numel() for p in model.parameters()):,} parameters, {n_train} training sequences, "
          f"{int(held.sum())} held-out, {len(hop_idx)} hop moves; before training: {test_metrics(model, test_set)}")
    while epoch < cfg.epochs:
        model.train()
        t0, tot = time.time(), np.zeros(3)
        # Each epoch's order comes from (seed, epoch): a resumed run shuffles exactly as an unbroken one.
        perm = train_idx[np.random.default_rng([cfg.seed, epoch]).permutation(n_train)]
        for i in tqdm(range(0, n_train, cfg.batch_size), desc=f"M epoch {epoch + 1}/{cfg.epochs}", unit="batch",
                      disable=None):  # disable=None: a bar on a terminal, none in a log file
            batch = {k: t[perm[i:i + cfg.batch_size]].to(dev) for k, t in data.items()}
            nll, win_bce, death_bce, _ = m_losses(model, batch)
            if not torch.isfinite(nll + win_bce + death_bce):
                fail(f"M's loss is not finite at epoch {epoch + 1}, step {step + 1}; the last good checkpoint is "
                     f"{cfg.out} (epoch {epoch}): lower --lr and run again with --resume")
            opt.zero_grad()
            (nll + win_bce + death_bce).backward()
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            step += 1
            tot += np.array([nll.item(), win_bce.item(), death_bce.item()])
        moves = hop_idx if epoch < cfg.hop_epochs else hop_idx[:0]  # after hop_epochs none (no hop_bce logged)
        hop_bce = hop_epoch(model, opt, hop, moves, np.random.default_rng([cfg.seed, epoch, 1]), cfg.batch_size, dev)
        epoch += 1
        nll, win_bce, death_bce = tot / math.ceil(n_train / cfg.batch_size)  # means over the epoch's batches
        row = dict(epoch=epoch, step=step, nll=nll, win_bce=win_bce, death_bce=death_bce, **test_metrics(model, test_set),
                   **({"hop_bce": hop_bce} if len(moves) else {}), test_hop_auc=hop_auc(model, hop, hop_test),
                   steps_per_s=float(data["step_mask"][train_idx].sum()) / (time.time() - t0))
        print("M " + " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
        save_atomic(dict(model=model.state_dict(), optimizer=opt.state_dict(), config=config, z_dim=z_dim, grid=grid,
                         epoch=epoch, step=step, hop_env_steps=hop_env_steps(cfg.hop_steps),
                         made_from=dict(vae=vae_id), id=identity(config, epoch=epoch, vae=vae_id)), cfg.out)
        with open(os.path.splitext(cfg.out)[0] + ".jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
    return model.cpu()


def load_mdnrnn(path):
    """Rebuild M from its checkpoint alone (a file that is not one gets vae.load_checkpoint's error line)."""
    from danger import HopHead
    from vae import load_checkpoint
    c = (ckpt := load_checkpoint(path))["config"]
    size = {k: c[f"hop_{k}"] for k in ("width", "convs") if f"hop_{k}" in c}  # older files: HopHead's default size
    hop = HopHead(ckpt["z_dim"], ckpt["grid"], **size) if ckpt.get("hop_env_steps") else None
    model = MDNRNN(ckpt["z_dim"], c["hidden"], c["gaussians"], hop=hop)
    model.load_state_dict({k: v.float() for k, v in ckpt["model"].items()})
    model.id = ckpt.get("id", "")  # what made it: later stages record it (made_from)
    return model.eval()


if __name__ == "__main__":
    from collect import cli, interruptible
    torch.set_num_threads(os.cpu_count() or 1)
    interruptible(train, cli(MDNConfig))
