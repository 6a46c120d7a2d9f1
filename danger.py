"""What kills the frog: "hop, then wait" play, and two answers to "does this move kill?" learnt from it.

Random play labels a death blurrily (did the frog die of this hop or of the next?), so M's death head
on the LSTM's h stays near chance. Hop-then-wait play (a move, then 5-12 no-ops) ties each death to one
move. From it learn M's hop head (HopHead, a part of the world model: it reads V's z of two frames;
trained in mdnrnn.py's stage with hop_latents, hop_epoch) and D (DangerNet, not in Ha & Schmidhuber: a
CNN on the pixels of two frames, the cars' speeds need two), for C to read. death_probe scores both on
held-out levels. See the README: "Does the world model know what kills?".

    python danger.py --out runs/danger.pt --steps 400000      # D (M's hop head trains in mdnrnn.py)
"""
import dataclasses
import json
import os
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from collect import ACTIONS, NONE, UP, check_flags, cli, fail, interruptible, make_env
from vae import (ReLU, identity, load_checkpoint, load_vae, pick_device, resume_point, save_atomic, start_training,
                 to_input)

MOVE_PROBS = [0.1, 0.05, 0.15, 0.6, 0.1]  # LEFT, DOWN, NONE, UP, RIGHT: mostly UP, to reach the river


@dataclass
class DangerConfig:
    out: str = "runs/danger.pt"  # checkpoint; a .jsonl log goes beside it
    distribution_mode: Literal["easy", "hard"] = "easy"  # procgen difficulty
    steps: int = 400_000  # env steps of hop-then-wait play (counted in the run's env steps)
    num_envs: int = 256  # envs stepped together
    epochs: int = 20  # passes over the recorded UPs (hard mode's test AUC still rises at 20)
    mirror: bool = True  # mirror half of each batch left-right: the game is symmetric, the data doubles
    batch_size: int = 128  # UPs per gradient step
    lr: float = 1e-3  # Adam learning rate
    holdout: int = 10  # every holdout-th UP is kept out of training, for the test AUC
    seed: int = 0  # seeds the levels, the play and torch
    resume: bool = False  # continue from --out (the play is replayed, then training goes on)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # where to train (auto: the GPU if torch sees one)

    def __post_init__(self):
        pick_device(self.device)
        check_flags(self, at_least=dict(steps=1, num_envs=1, epochs=1, batch_size=1, holdout=0), above=dict(lr=0))
        if self.steps < self.num_envs:
            fail(f"--steps {self.steps}: expected at least --num-envs ({self.num_envs}), one step of every env")


class DangerNet(nn.Module):
    """(this frame, last frame) uint8 (B,64,64,3) each -> the logit of "this UP is deadly" (B,)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(  # (B,6,64,64) -> (B,1)
            nn.Conv2d(6, 32, 4, 2, 1), ReLU(), nn.Conv2d(32, 64, 4, 2, 1), ReLU(),
            nn.Conv2d(64, 64, 4, 2, 1), ReLU(), nn.Flatten(), nn.Linear(64 * 8 * 8, 256), ReLU(),
            nn.Linear(256, 1))
        self.to(memory_format=torch.channels_last)  # NHWC conv weights: ~30% faster on CPU

    def forward(self, obs, last):
        x = torch.cat([torch.as_tensor(obs), torch.as_tensor(last)], -1).to(self.net[0].weight.device)  # (B,64,64,6)
        return self.net(x.permute(0, 3, 1, 2).float().div(255))[:, 0]  # (B,6,64,64) -> (B,)


class HopHead(nn.Module):
    """M's hop head (mdnrnn.MDNRNN.hop), the world model's answer to "does this move kill?": the logit of P(the frog
    dies before its next move | move a now), from V's z of this frame and the last (the cars' speeds need two). A
    spatial z is read as what it is, z_dim/64 channels on V's 8x8 grid of cells, by `convs` 3x3 convs (the action:
    5 constant planes); a flat z by an MLP. Not a second perception: it sees the game only through V."""

    def __init__(self, z_dim, grid=True, n_actions=5, width=32, convs=2):
        super().__init__()
        self.grid, self.n_actions = grid, n_actions
        ins = [2 * z_dim // 64 + n_actions] + [width] * (convs - 1)  # each 3x3 conv sees one more cell around
        self.net = nn.Sequential(  # (B,2c+A,8,8) -> (B,1)
            *[m for c in ins for m in (nn.Conv2d(c, width, 3, 1, 1), nn.ReLU())], nn.Flatten(),
            nn.Linear(width * 64, 64), nn.ReLU(), nn.Linear(64, 1)) if grid else \
            nn.Sequential(nn.Linear(2 * z_dim + n_actions, 256), nn.ReLU(), nn.Linear(256, 1))  # (B,2Z+A) -> (B,1)

    def forward(self, z, z_last, action):
        """z, z_last (B,Z), action indices (B,) -> logits (B,)."""
        a, n = F.one_hot(action.long(), self.n_actions).float(), len(z)  # (B,A)
        return self.net(torch.cat([z.view(n, -1, 8, 8), z_last.view(n, -1, 8, 8), a[..., None, None].expand(
            -1, -1, 8, 8)], 1) if self.grid else torch.cat([z, z_last, a], 1))[:, 0]  # (B,2c+A,8,8) or (B,2Z+A)


def auc(score, y):
    """Area under the ROC curve by ranks: P(score of a positive > score of a negative), ties broken by order."""
    rank, pos = np.argsort(np.argsort(score, kind="stable")), y > 0
    if pos.all() or not pos.any():  # undefined without both classes
        return float("nan")
    return float((rank[pos].mean() - (pos.sum() - 1) / 2) / (~pos).sum())


def pair(obs, last, a, env):
    """What D learns from for each UP: this frame and the last, (n,64,64,6) uint8."""
    return np.concatenate([obs, last], -1)


def hop_then_wait(distribution_mode, steps, num_envs, seed, record=pair, moves=(UP,)):
    """Every move in `moves` (action indices; D's: UP) of hop-then-wait play: what record(obs, last, a, env) makes
    of it (called at each step for the envs making such a move, (n,...) each; default: the frame pair), and
    died (N,): the episode ended without the prize before the next move."""
    env = make_env(num_envs, distribution_mode, seed=seed)
    rng, n = np.random.default_rng(seed), num_envs
    obs = env.observe()[1]["rgb"]
    last, wait, pending = obs.copy(), np.zeros(n, dtype=int), [None] * n  # pending: env i's open move
    X, Y = [], []
    for _ in tqdm(range(steps // n), desc="hop-then-wait", unit="step", disable=None):
        move = wait == 0  # (n,) envs that choose a new move now
        a = np.where(move, rng.choice(len(ACTIONS), size=n, p=MOVE_PROBS), NONE)
        wait = np.where(move, rng.integers(5, 13, size=n), wait - 1)  # a move, then wait - 1 no-ops
        for i in np.flatnonzero(move):
            if pending[i] is not None:  # its last move survived until this one
                X.append(pending[i])
                Y.append(0.0)
            pending[i] = None
        rec = np.flatnonzero(move & np.isin(a, moves))  # (k,) the envs whose move is recorded
        for i, item in zip(rec, record(obs[rec], last[rec], a[rec], rec) if len(rec) else []):
            pending[i] = item
        env.act(ACTIONS[a])
        rew, new, first = env.observe()
        for i in np.flatnonzero(first):  # CRUCIAL: procgen auto-resets; new[i] is the next level
            if pending[i] is not None:
                X.append(pending[i])
                Y.append(float(rew[i] <= 0))  # the episode ended without the prize: the move killed
            pending[i], wait[i] = None, 0
        last, obs = np.where(first[:, None, None, None], new["rgb"], obs), new["rgb"]
    return (np.stack(X) if X else np.empty(0)), np.array(Y, dtype=np.float32)


@torch.no_grad()
def hop_latents(vae, distribution_mode, steps, num_envs, seed):
    """Every move of hop-then-wait play as V sees it, for M's hop head: -> z, z_last (N,Z) (V's mu of the move's
    frame and the one before), the same two of the mirrored frames, the action (N,), its env (N,), died (N,)."""
    def record(obs, last, a, env):  # (n,64,64,3) x2, (n,) x2 -> (n,4Z+2)
        x = [to_input(f) for f in (obs, last)]  # (n,3,64,64) each
        z = [vae.encode(t)[0] for t in (*x, *(t.flip(-1) for t in x))]  # (n,Z) each: z, z_last, both mirrored
        return torch.cat([*z, torch.from_numpy(np.stack([a, env], 1))], 1).numpy().astype(np.float32)
    X, y = hop_then_wait(distribution_mode, steps, num_envs, seed, record, moves=range(len(ACTIONS)))
    X = X.reshape(len(y), -1)  # (N,4Z+2), also when no move ended
    z, z_last, z_mirror, z_last_mirror = np.split(X[:, :-2], 4, axis=1)  # (N,Z) each
    return dict(z=z, z_last=z_last, z_mirror=z_mirror, z_last_mirror=z_last_mirror,
                action=X[:, -2].astype(np.int64), env=X[:, -1].astype(np.int64), died=y)


MIRROR = torch.tensor([4, 1, 2, 3, 0])  # an action index seen in a mirror: LEFT <-> RIGHT (collect.ACTION_NAMES)


def hop_envs(steps):
    """Envs of the hop-then-wait play: up to 256, each playing at least 64 steps (a move ends 5-12 steps later)."""
    return min(256, max(1, steps // 64))


def hop_env_steps(steps):
    """The env steps hop_set's play takes: whole steps of all its envs."""
    return (steps // hop_envs(steps)) * hop_envs(steps) if steps else 0


def hop_set(cfg):
    """Every move of cfg.hop_steps of hop-then-wait play, encoded by V (danger.hop_latents): a dict of tensors, the
    training moves' indices and the held-out ones' (those of every holdout-th env: levels training never sees)."""
    if not cfg.hop_steps:
        return None, torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    hop = {k: torch.from_numpy(v) for k, v in hop_latents(load_vae(cfg.vae), cfg.distribution_mode, cfg.hop_steps,
                                                         hop_envs(cfg.hop_steps), cfg.seed).items()}  # (N,...)
    held = hop["env"] % cfg.holdout == cfg.holdout - 1 if cfg.holdout else torch.zeros(len(hop["env"]), dtype=bool)
    return hop, (~held).nonzero()[:, 0], held.nonzero()[:, 0]


def hop_epoch(model, opt, hop, idx, rng, batch_size, dev):
    """One pass of M's hop head over the moves idx, each seen mirrored with probability 1/2 (the game is
    symmetric: cars and logs just run the other way). -> the mean BCE (nan without moves)."""
    total, perm = 0.0, idx[rng.permutation(len(idx))]
    for i in range(0, len(perm), batch_size):
        b = perm[i:i + batch_size]
        m = torch.from_numpy(rng.random(len(b)) < 0.5)  # (B,) the moves seen in the mirror
        z, z_last = (torch.where(m[:, None], hop[k + "_mirror"][b], hop[k][b]).to(dev) for k in ("z", "z_last"))
        a = torch.where(m, MIRROR[hop["action"][b]], hop["action"][b]).to(dev)  # (B,)
        loss = F.binary_cross_entropy_with_logits(model.hop(z, z_last, a), hop["died"][b].to(dev))
        opt.zero_grad()  # only the hop head gets gradients here: Adam leaves the rest of M alone
        loss.backward()
        opt.step()
        total += loss.item() * len(b)
    return total / len(perm) if len(perm) else float("nan")


@torch.no_grad()
def hop_auc(model, hop, idx):
    """AUC of M's hop head over the held-out UPs (nan without both classes): the test D is measured by."""
    model.eval()
    up = idx[hop["action"][idx] == UP] if hop is not None else idx
    if not len(up):
        return float("nan")
    dev = next(model.parameters()).device
    return auc(model.hop(hop["z"][up].to(dev), hop["z_last"][up].to(dev), hop["action"][up].to(dev)).cpu().numpy(),
               hop["died"][up].numpy())


def scores(model, X, idx, batch=512):
    """D's logits (len(idx),) for the pairs X[idx], in batches, no grad."""
    with torch.no_grad():
        return torch.cat([model(X[b, ..., :3], X[b, ..., 3:]) for b in np.array_split(idx, max(len(idx) // batch, 1))])


def train(cfg):
    ckpt = resume_point(cfg)
    if ckpt and ckpt["epoch"] >= cfg.epochs:
        print(f"D: {cfg.out} already has {cfg.epochs} epochs, skipping")
        return load_danger(cfg.out)
    os.makedirs(os.path.dirname(os.path.abspath(cfg.out)), exist_ok=True)
    torch.manual_seed(cfg.seed)  # seeding, in one place: the play (levels, moves), weights, shuffling
    # A resumed D plays again: the same seed replays the same play, so it sees the same UPs.
    X, y = hop_then_wait(cfg.distribution_mode, cfg.steps, cfg.num_envs, cfg.seed)
    test = np.arange(len(y)) % cfg.holdout == cfg.holdout - 1 if cfg.holdout > 0 else np.zeros(len(y), bool)
    train_idx, test_idx = np.flatnonzero(~test), np.flatnonzero(test)
    print(f"D: {cfg.steps} env steps of hop-then-wait, {len(y)} UPs ({y.mean():.1%} deadly), {len(test_idx)} held out")
    model, opt, epoch, _, dev = start_training(DangerNet(), cfg.lr, ckpt, cfg.device)
    if ckpt:
        print(f"D: resumed {cfg.out} at epoch {epoch}")
    while epoch < cfg.epochs:
        t0, total = time.time(), 0.0
        rng = np.random.default_rng([cfg.seed, epoch])  # this epoch's shuffle and mirrors
        perm = rng.permutation(train_idx)
        model.train()
        for i in tqdm(range(0, len(perm), cfg.batch_size), desc=f"D epoch {epoch + 1}/{cfg.epochs}", unit="batch",
                      disable=None):  # disable=None: a bar on a terminal, none in a log file
            b = perm[i:i + cfg.batch_size]
            x = X[b]  # (B,64,64,6)
            if cfg.mirror:  # a mirrored pair of frames is a real situation too: cars and logs just run the other way
                x = np.where(rng.random(len(b))[:, None, None, None] < 0.5, x[:, :, ::-1], x)  # (B,64,64,6)
            loss = F.binary_cross_entropy_with_logits(model(x[..., :3], x[..., 3:]), torch.from_numpy(y[b]).to(dev))
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(b)
        epoch += 1
        model.eval()
        test_auc = auc(scores(model, X, test_idx).cpu().numpy(), y[test_idx]) if len(test_idx) else float("nan")
        row = dict(epoch=epoch, bce=total / len(perm), test_auc=test_auc, ups_per_s=len(perm) / (time.time() - t0))
        print("D " + " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
        config = dataclasses.asdict(cfg)
        save_atomic(dict(model=model.state_dict(), optimizer=opt.state_dict(), config=config, epoch=epoch,
                         env_steps=(cfg.steps // cfg.num_envs) * cfg.num_envs, test_auc=test_auc,
                         id=identity(config, epoch=epoch)), cfg.out)
        with open(os.path.splitext(cfg.out)[0] + ".jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
    return model.cpu().eval()


@torch.no_grad()
def death_probe(vae, mdn, danger=None, distribution_mode="easy", steps=50_000, num_envs=64, seed=1_000_003):
    """The test of "this UP kills" on levels no training step saw (seed: evaluate.py's held-out stream): every
    UP of hop-then-wait play scored by D (its logit) and by V and M (M's hop head on V's z); -> the AUC of each."""
    num_envs = min(num_envs, steps)  # at least one step of every env

    def record(obs, last, a, env):  # the UPs of a step: D on their frames, M's hop head on V's z of them
        d = danger(obs, last).cpu().numpy() if danger is not None else np.full(len(obs), np.nan)
        m = (mdn.hop(*(vae.encode(to_input(f))[0] for f in (obs, last)), torch.full((len(obs),), UP)).numpy()
             if mdn.hop is not None else np.full(len(obs), np.nan))
        return np.stack([d, m], 1).astype(np.float32)  # (n,2)
    S, y = hop_then_wait(distribution_mode, steps, num_envs, seed, record)
    S = S.reshape(len(y), 2)  # (N,2), also when no UP ended
    return dict(ups=len(y), deadly=float(y.mean()) if len(y) else float("nan"),
                d_auc=auc(S[:, 0], y) if danger is not None else None,
                m_auc=auc(S[:, 1], y) if mdn.hop is not None else None)


def danger_logit(inputs, d, mdn, z, z_last, obs, last):
    """C's "UP kills" input (n,): D's logit on two frames (n,64,64,3), M's hop head's on two z's (n,Z), or None."""
    return d(obs, last) if "d" in inputs else mdn.hop(z, z_last, torch.full((len(z),), UP)) if "m" in inputs else None


def start_point(n_params, inputs, danger_prior=0.0, threshold=0.0):
    """C's start for CMA-ES (5,n_features+1), bias last: zero, or with d (or m) and danger_prior the controller it
    implies, "UP iff that logit < threshold, else no-op", a prior the search can leave (in hard mode CMA-ES from zero
    missed it)."""
    x0 = np.zeros((len(ACTIONS), n_params // len(ACTIONS)))  # (5,n_features+1)
    if inputs[-1] in "dm":
        x0[UP, -2:] = -danger_prior, danger_prior * threshold  # UP's score prior * (thr - logit) > 0 iff logit < thr
        x0[[a for a in range(len(ACTIONS)) if a not in (UP, NONE)], -1] -= danger_prior  # else NONE wins
    return x0


def load_danger(path):
    """Rebuild D from its checkpoint alone."""
    model, ckpt = DangerNet(), load_checkpoint(path)
    model.load_state_dict({k: v.float() for k, v in ckpt["model"].items()})
    model.id = ckpt.get("id", "")  # what made it: later stages record it (made_from)
    return model.eval()


if __name__ == "__main__":
    torch.set_num_threads(os.cpu_count() or 1)
    interruptible(train, cli(DangerConfig))
