"""D: a danger head, P(this UP is deadly | this frame, the last frame), for C to read.

Not in Ha & Schmidhuber: it plays the part of M's done head (the Doom experiment, section 4), which
cannot learn leaper's deaths here. Random play labels a death blurrily (did the frog die of this hop
or of the next?) and V's z blurs the frog and the cars; the done head stays at chance. D is trained
on "hop, then wait" play instead (a move, then 5-12 no-ops, so a death before the next move belongs
to that move), from the pixels of two frames (the cars' speeds need two). See the README: "Why C
stops at always-UP" for the measurements that led here.

    python danger.py --out runs/danger.pt --steps 400000
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
from mdnrnn import auc
from vae import ReLU, identity, load_checkpoint, pick_device, resume_point, save_atomic, start_training, to_input

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


def pair(obs, last, a, wait, first):
    """What D learns from for each env's UP: this frame and the last, (n,64,64,6) uint8."""
    return np.concatenate([obs, last], -1)


def hop_then_wait(distribution_mode, steps, num_envs, seed, record=pair):
    """Every UP of hop-then-wait play: record(obs, last, a, wait, first) of its step (default: the frame pair;
    called at every step with the whole batch, so that a recorder may keep memory) and died (N,)."""
    env = make_env(num_envs, distribution_mode, seed=seed)
    rng, n = np.random.default_rng(seed), num_envs
    obs = env.observe()[1]["rgb"]
    last, wait, pending, first = obs.copy(), np.zeros(n, dtype=int), [None] * n, np.ones(n, dtype=bool)
    X, Y = [], []  # pending: env i's open UP
    for _ in tqdm(range(steps // n), desc="hop-then-wait", unit="step", disable=None):
        move = wait == 0  # (n,) envs that choose a new move now
        a = np.where(move, rng.choice(len(ACTIONS), size=n, p=MOVE_PROBS), NONE)
        wait = np.where(move, rng.integers(5, 13, size=n), wait - 1)  # a move, then wait - 1 no-ops
        item = record(obs, last, a, wait, first)
        for i in np.flatnonzero(move):
            if pending[i] is not None:  # its last UP survived until this move
                X.append(pending[i])
                Y.append(0.0)
            pending[i] = item[i].copy() if a[i] == UP else None  # a copy: a view would keep the whole batch
        env.act(ACTIONS[a])
        rew, new, first = env.observe()
        for i in np.flatnonzero(first):  # CRUCIAL: procgen auto-resets; new[i] is the next level
            if pending[i] is not None:
                X.append(pending[i])
                Y.append(float(rew[i] <= 0))  # the episode ended without the prize: the UP killed
            pending[i], wait[i] = None, 0
        last, obs = np.where(first[:, None, None, None], new["rgb"], obs), new["rgb"]
    return (np.stack(X) if X else np.empty((0, *item.shape[1:]), item.dtype)), np.array(Y, dtype=np.float32)


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
def imagine_death(mdn, z, state, wait):
    """V and M's answer to "does this UP kill?": from V's z (n,Z) and M's memory before it (h, c), M takes the UP,
    then dreams wait - 1 no-ops on its most likely next z (tau -> 0). -> P(death right after the UP) (n,) and
    P(death before the next move) (n,), 1 - prod(1 - p_k) over the wait (n,) imagined steps."""
    a, survive, first_p = torch.full((len(z),), UP), torch.ones(len(z)), None
    for k in range(int(wait.max())):
        (logit_pi, mu, _), _, death_logit, state = mdn.step(z, a, state)
        p = torch.sigmoid(death_logit[:, 0]) * (k < wait)  # (n,) an env's wait over: no more risk counted
        first_p = p if first_p is None else first_p
        survive = survive * (1 - p)
        z = mu[:, 0].gather(-1, logit_pi[:, 0].argmax(-1, keepdim=True))[..., 0]  # (n,Z,K) -> (n,Z)
        a = torch.full_like(a, NONE)
    return first_p, 1 - survive


@torch.no_grad()
def death_probe(vae, mdn, danger=None, distribution_mode="easy", steps=50_000, num_envs=64, seed=1_000_003):
    """The test of "this UP kills" on levels no training step saw (seed: evaluate.py's held-out stream): every
    UP of hop-then-wait play scored by D (its logit) and by V and M (imagine_death); -> the AUC of each."""
    num_envs = min(num_envs, steps)  # at least one step of every env
    state = torch.zeros(2, 1, num_envs, mdn.hidden).unbind()  # M's memory (h, c), each (1,n,H)

    def record(obs, last, a, wait, first):  # every step: V encodes, M remembers; the UPs get scored
        nonlocal state
        state[0][:, first], state[1][:, first] = 0.0, 0.0  # a new level: M's memory starts empty
        z = vae.encode(to_input(obs))[0]  # (n,Z), mu
        out, up = np.full((len(obs), 3), np.nan, dtype=np.float32), np.flatnonzero(a == UP)  # D, M next, M wait
        if len(up):
            out[up, 0] = danger(obs[up], last[up]).cpu().numpy() if danger is not None else np.nan
            m = imagine_death(mdn, z[up], (state[0][:, up], state[1][:, up]), torch.from_numpy(wait[up]))
            out[up, 1], out[up, 2] = (t.numpy() for t in m)
        state = mdn.advance(z, torch.from_numpy(a), state)
        return out
    S, y = hop_then_wait(distribution_mode, steps, num_envs, seed, record)  # (N,3), (N,)
    return dict(ups=len(y), deadly=float(y.mean()) if len(y) else float("nan"),
                d_auc=auc(S[:, 0], y) if danger is not None else None,
                m_auc=auc(S[:, 2], y), m_auc_next_step=auc(S[:, 1], y))


def start_point(n_params, inputs, danger_prior=0.0):
    """C's start for CMA-ES (5,n_features+1), bias last: zero, or with d and danger_prior the controller D implies,
    "UP iff D's logit < 0, else no-op", a prior the search can leave (in hard mode CMA-ES from zero missed it)."""
    x0 = np.zeros((len(ACTIONS), n_params // len(ACTIONS)))  # (5,n_features+1)
    if "d" in inputs:
        x0[UP, -2] = -danger_prior  # d is C's last input, just before the bias
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
