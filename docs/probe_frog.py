"""Probe: is the frog in V's z? M's hop head on V's frozen z, with and without the frog's position handed to it.

M's hop head (danger.HopHead, "does this move kill?") reads the game through V's z alone. In hard mode it stays near
AUC 0.65 whatever V is (README), and V's reconstructions (docs/vae_hard.png) never draw the frog, a 3x3-pixel green
sprite there. This probe finds the frog by its colour (a cheat only a probe may use: the agent sees the game through
V), pools it onto V's 8x8 grid as one more channel, and trains three hop heads as M's stage trains its own (every
move of hop-then-wait play on levels of seed --seed, half of them mirrored; every --holdout-th env held out) on:
V's z, V's z plus the frog channel, and the frog channel alone. Printed: each head's AUC on the held-out envs' UPs
after every epoch. If z plus the frog comes near D, what V loses is the frog. frog_of, frog_steps and frog_course
find the frog's centre the same way for docs/probe_frog_dream.py; imagined and frog_frames play and draw its dream,
death_aucs measures its death logit, Located reads it as M's hop head is read.

    python docs/probe_frog.py --vae pretrained/hard/vae.pt --distribution-mode hard
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
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # and the probes beside it
from collect import UP, check_flags, cli, fail, list_episodes, load_episode  # noqa: E402
from danger import HopHead, auc, hop_auc, hop_envs, hop_epoch, hop_latents  # noqa: E402
from dream_bench import real_frames  # noqa: E402
from evaluate import decode  # noqa: E402
from vae import load_vae  # noqa: E402

FROG_LO, FROG_HI = (130, 170, -1), (190, 256, 90)  # RGB bounds (exclusive) of the frog's green in both modes; the
# yellow cars (255,204,0), the grey roads and the brown logs fall outside (measured on frames of collect.py)


@dataclass
class ProbeConfig:
    vae: str = "runs/vae.pt"  # the V whose z is probed (a spatial one: the frog is pooled onto its 8x8 grid)
    distribution_mode: Literal["easy", "hard"] = "easy"  # procgen difficulty of the play (V's)
    hop_steps: int = 400_000  # env steps of hop-then-wait play (M's stage's default)
    epochs: int = 10  # passes of each head over the training moves
    batch_size: int = 64  # moves per gradient step (M's stage: its --batch-size)
    holdout: int = 20  # every holdout-th env of the play is held out (levels no training move saw)
    seed: int = 0  # seeds the play's levels and moves, the heads' weights and the shuffling

    def __post_init__(self):
        check_flags(self, at_least=dict(hop_steps=256, epochs=1, batch_size=1, holdout=2))


def frog_of(obs):
    """Frames (T,64,64,3) uint8 -> the frog's centre (T,2), (y, x) in pixels, found by its colour; a frame without
    a frog-green pixel keeps the last frame's centre (the first frame's: the middle)."""
    rgb = obs.astype(np.int16)  # FROG_LO holds -1 and FROG_HI 256: compare outside uint8
    m = ((rgb > FROG_LO) & (rgb < FROG_HI)).all(-1)  # (T,64,64)
    n, ramp = m.sum((1, 2)), np.arange(64)
    pos = np.stack([m.sum(2) @ ramp, m.sum(1) @ ramp], 1) / np.maximum(n, 1)[:, None]  # (T,2)
    for t in np.flatnonzero(n == 0):
        pos[t] = pos[t - 1] if t else 31.5
    return pos.astype(np.float32)


def frog_steps(run, holdout=20):
    """The frog's centre at every step of the run's episodes, in steps_of's order and split (training, held out):
    pos (at t), pos_last (t-1; t at t = 0), pos_next (t+1; t at the last step)."""
    paths = list_episodes(os.path.join(run, "data"))
    cols = [{k: [] for k in ("pos", "pos_last", "pos_next")} for _ in range(2)]
    for i, path in enumerate(paths):
        pos, col = torch.from_numpy(frog_of(load_episode(path)["obs"])), cols[i % holdout == holdout - 1]  # (T,2)
        col["pos"].append(pos)
        col["pos_last"].append(torch.cat([pos[:1], pos[:-1]]))  # (T,2)
        col["pos_next"].append(torch.cat([pos[1:], pos[-1:]]))  # (T,2)
    return [{k: torch.cat(v) for k, v in c.items()} for c in cols]


def frog_course(distribution_mode, actions, seed):
    """The frog's centre (n,T+1,2) in the real game (dream_bench.real_frames). CRUCIAL: a level that ends restarts,
    and its frog is back at the bottom."""
    return torch.from_numpy(np.stack([frog_of(f) for f in real_frames(distribution_mode, actions, seed)]))


@torch.no_grad()
def imagined(model, z0, actions, tau=1.0, level="sample"):
    """The frog model's dream from V's z0 (n,Z) under the action indices [(n,)] * T -> the level's z (n,T+1,Z) and
    the frog's centre (n,T+1,2), which starts where the locator finds it."""
    z, z_last, pos = z0, z0, model.locate(z0)
    zs, places, pos_last = [z], [pos], pos
    for a in actions:
        _, _, z_next, pos_next = model.imagine(z, z_last, pos, pos_last, a, tau, level)
        z_last, z, pos_last, pos = z, z_next, pos, pos_next
        zs.append(z), places.append(pos)
    return torch.stack(zs, 1), torch.stack(places, 1)


class Located(nn.Module):  # a frog model's death logit from V's z alone, called as M's hop head is: (z, z_last, a)
    def __init__(self, model):
        super().__init__()
        self.model, self.forward = model, model.hop


@torch.no_grad()
def death_aucs(model, mdn, vae, distribution_mode, steps, seed=7_000_001):
    """The frog model's death logit (model.hop, with 0, 6 and 12 steps of lookahead) and M's hop head on the UPs of
    `steps` env steps of hop-then-wait play on seed's levels: the AUC of "this UP kills" -> {lookahead: AUC}."""
    hop = {k: torch.from_numpy(v) for k, v in hop_latents(vae, distribution_mode, steps, hop_envs(steps),
                                                           seed).items()}
    up = (hop["action"] == UP).nonzero()[:, 0]  # (U,)
    x, died = (hop["z"][up], hop["z_last"][up], hop["action"][up]), hop["died"][up].numpy()
    aucs = {L: auc(model.hop(*x, L).numpy(), died) for L in (0, 6, 12)}
    m_auc = auc(mdn.hop(*x).numpy(), died) if mdn.hop is not None else float("nan")
    print(f"hop-then-wait UPs of new levels ({len(up)}): AUC of the frog model's death logit, its 6- and 12-step "
          f"lookahead {' / '.join(f'{v:.3f}' for v in aucs.values())}; M's hop head {m_auc:.3f}")
    return aucs


def frog_frames(model, vae, tau, level="sample"):
    """write_strip's dream_frames for the frog model: V's decoding of the dreamt level at tau, the dreamt frog painted
    on it as a magenta 3x3 square (V's own drawing of the frog comes from the level's z and may disagree)."""
    def frames(z0, actions):
        zs, places = imagined(model, z0, actions, tau, level)  # (n,T+1,Z), (n,T+1,2)
        img = decode(vae, zs.flatten(0, 1))  # (n*(T+1),64,64,3)
        for frame, (y, x) in zip(img, places.flatten(0, 1).round().long().tolist()):  # (n*(T+1),2)
            frame[max(y - 1, 0):y + 2, max(x - 1, 0):x + 2] = (255, 0, 255)
        return img.reshape(len(z0), -1, 64, 64, 3)  # (n,T+1,64,64,3)
    return frames


def frog_cells(x):
    """Frames (n,3,64,64) in [0,1] -> (n,64): the share of frog-green pixels in each of V's 8x8-pixel cells, x8
    (a frog that fills a quarter of a cell gives 2, the scale of V's z)."""
    rgb = (x * 255).round()  # (n,3,64,64)
    lo, hi = torch.tensor(FROG_LO)[:, None, None], torch.tensor(FROG_HI)[:, None, None]  # (3,1,1) each
    frog = ((rgb > lo) & (rgb < hi)).all(1, keepdim=True).float()  # (n,1,64,64)
    return F.avg_pool2d(frog, 8).flatten(1) * 8  # (n,1,8,8) -> (n,64)


class ZAndFrog(nn.Module):
    """What hop_latents records per frame: V's mu, then the frog channel. -> (n,Z+64)"""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def encode(self, x):
        return torch.cat([self.vae.encode(x)[0], frog_cells(x)], 1), None  # (n,Z) + (n,64)


def train_head(hop, cols, train_idx, test_idx, cfg):
    """A new hop head on the columns cols of every recorded z -> its held-out UP AUC after each epoch."""
    torch.manual_seed(cfg.seed)  # the same start for every head
    data = {k: v[:, cols] if k.startswith("z") else v for k, v in hop.items()}  # z, z_last and their mirrors
    holder = nn.Module()  # danger.hop_epoch trains model.hop, as in M
    holder.hop = HopHead(len(cols), grid=True)  # len(cols)/64 channels per cell
    opt = torch.optim.Adam(holder.parameters(), lr=1e-3)  # M's --lr
    aucs = []
    for epoch in range(cfg.epochs):
        holder.train()
        hop_epoch(holder, opt, data, train_idx, np.random.default_rng([cfg.seed, epoch, 1]), cfg.batch_size, "cpu")
        aucs.append(hop_auc(holder, data, test_idx))
    return aucs


def main(cfg):
    vae = load_vae(cfg.vae)
    if not vae.spatial:
        fail(f"--vae {cfg.vae}: a flat V (--spatial false); the frog is pooled onto a spatial V's 8x8 grid")
    hop = {k: torch.from_numpy(v) for k, v in hop_latents(ZAndFrog(vae).eval(), cfg.distribution_mode, cfg.hop_steps,
                                                         hop_envs(cfg.hop_steps), cfg.seed).items()}  # (N,...)
    held = hop["env"] % cfg.holdout == cfg.holdout - 1
    train_idx, test_idx = (~held).nonzero()[:, 0], held.nonzero()[:, 0]
    z_dim = vae.z_dim
    seen = (hop["z"][:, z_dim:].sum(1) > 0).float().mean().item()
    print(f"{cfg.vae}: {len(hop['died'])} moves of {cfg.hop_steps} {cfg.distribution_mode} steps "
          f"({hop['died'].mean().item():.1%} deadly, {len(test_idx)} held out); the frog found in {seen:.1%} of them")
    heads = {"V's z": list(range(z_dim)), "z + frog": list(range(z_dim + 64)),
             "frog alone": list(range(z_dim, z_dim + 64))}  # columns of the recorded (N,Z+64)
    aucs = {name: train_head(hop, cols, train_idx, test_idx, cfg) for name, cols in heads.items()}
    print("held-out UP AUC after each epoch")
    print(f"{'epoch':>5} " + " ".join(f"{name:>10}" for name in heads))
    for epoch in range(cfg.epochs):
        print(f"{epoch + 1:>5} " + " ".join(f"{aucs[name][epoch]:>10.3f}" for name in heads))


if __name__ == "__main__":
    torch.set_num_threads(os.cpu_count() or 1)
    main(cli(ProbeConfig))
