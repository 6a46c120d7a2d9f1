"""Probe: a dream on V's 8x8 grid. Can C learn inside a world model whose transition is convolutional?

M (an LSTM on the flat z) does not move the frog in its dream (docs/probe_dream_dynamics.py); a conv net on V's grid
does, for a few steps. Here that conv transition (probe_dream_dynamics.ConvTransition) gets what a dream also needs:
a spread per latent (sampled at temperature tau, as Ha's), and win and death heads (danger.HopHead's shape), trained
on the run's encoded random episodes (latents/, M's held-out episodes left out); with --unroll K the model is fed its
own predictions K steps in training (PlaNet's "overshooting"): a dream runs on predictions, not on V's z. Printed:
the held-out one-step error beside copying z, the heads' AUCs, dreams from held-out first frames under constant
actions (a dream fit to learn in lets always-UP win more than always-NONE, which never wins in the game), and with
--generations N, C (on [z, h, the death logit of UP]) searched by CMA-ES in the dream from zero, its mean checked
on real validation levels every 5 generations and at the end on held-out levels beside always-UP.

    python docs/probe_grid_dream.py --run runs --unroll 6 --generations 30
"""
import math
import os
import sys
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo's modules
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # and the probe beside it (also when imported)
from collect import MAX_STEPS, UP, check_flags, cli, fail  # noqa: E402
from danger import HopHead, auc  # noqa: E402
from dream_bench import constant_table, dream_loop, first_z, fit, search_c, write_strip  # noqa: E402
from evaluate import decode  # noqa: E402
from mdnrnn import load_mdnrnn, read_latents  # noqa: E402
from probe_code_dream import code_model  # noqa: E402
from probe_dream_dynamics import ConvTransition  # noqa: E402
from vae import load_vae  # noqa: E402

LIMIT = 3.0  # the categorical's bins span [-LIMIT, LIMIT] of z's change per step: 99.99% of V's mu change by < 2.2


@dataclass
class ProbeConfig:
    run: str = "runs"  # directory holding vae.pt, mdnrnn.pt (C's h) and latents/ (the encoded episodes)
    distribution_mode: Literal["easy", "hard"] = "easy"  # procgen difficulty (the run's)
    steps: int = 3000  # gradient steps of the grid model
    unroll: int = 6  # training windows: the transition fed its own predictions this many steps (1: one-step)
    batch: int = 64  # windows per gradient step
    width: int = 64  # channels of the transition's convs (the heads: half)
    bins: int = 0  # > 0: z's change is a categorical over this many values per latent (0: one Gaussian per latent)
    codes: int = 0  # > 0: each cell's next value is one of this many k-means codes (docs/probe_code_dream.py)
    death_steps: int = 1  # the last this many steps of a dying episode are labelled death (the car comes first)
    tau: float = 1.0  # the dream's temperature: the Gaussian's spread * sqrt(tau), the categorical's logits / tau
    episodes: int = 256  # dreams per constant action, from held-out first frames
    generations: int = 0  # CMA-ES generations of C in the dream (0: no search)
    popsize: int = 32  # candidates per generation
    dream_episodes: int = 64  # dreams per candidate per generation, from new levels' first frames
    max_steps: int = 250  # a dream episode's cap in the search (the game's: 500)
    check_levels: int = 64  # real validation levels the CMA mean plays every 5 generations
    test_episodes: int = 1000  # held-out levels the searched C plays at the end (evaluate.py's stream)
    strip: str = ""  # a PNG to write: V's decoding of 4 dreams, hopping every 6 steps, beside the real game's frames
    seed: int = 0  # seeds the model's training, the dreams and CMA-ES

    def __post_init__(self):
        check_flags(self, at_least=dict(steps=1, unroll=1, bins=0, codes=0, death_steps=1, batch=1, width=2, episodes=1,
                                        generations=0, popsize=2, dream_episodes=1, max_steps=1, check_levels=1,
                                        test_episodes=1), above=dict(tau=0))
        if self.bins and self.codes:
            fail(f"--bins {self.bins} and --codes {self.codes}: expected one of them (the other 0)")


class GridModel(nn.Module):
    """A world model on V's grid: the next z (per latent one Gaussian, the conv transition's mean and a learnt std, or
    with bins a categorical over changes: a sharp sample, not an average of places), the win and death logits."""

    def __init__(self, z_dim, width=64, bins=0, extra=0):
        super().__init__()
        c, self.bins, self.gaussian = z_dim // 64, bins, not bins
        self.move = ConvTransition(c, width, out=c * bins, extra=extra)  # extra: planes more than z and the action
        self.win, self.death = HopHead(z_dim, width=width // 2), HopHead(z_dim, width=width // 2)
        self.log_sigma = nn.Parameter(torch.zeros(z_dim))  # (Z,) the Gaussian's; unused with bins
        u = torch.linspace(-1, 1, max(bins, 2))  # (B,) the bins' changes: dense near 0, where most changes are
        self.register_buffer("centres", LIMIT * u.sign() * u.pow(2))

    def forward(self, z, z_last, a):
        """z, z_last (N,Z), action indices (N,) -> the next z's distribution (Gaussian: its mean and log std, (N,Z)
        each; categorical: the logits of the change (N,Z,B) and z), the win and death logits (N,)."""
        y, n = self.move(z, z_last, a), len(z)
        if self.bins:  # (N,c*B,8,8) -> (N,c,B,8,8) -> (N,c,8,8,B) -> (N,Z,B), Z in z's own order (channel, cell)
            dist = (y.view(n, -1, self.bins, 8, 8).permute(0, 1, 3, 4, 2).reshape(n, -1, self.bins), z)
        else:
            dist = (y, self.log_sigma.clamp(-5, 2).expand_as(y))
        return dist, self.win(z, z_last, a), self.death(z, z_last, a)

    def nll(self, dist, target):
        """-log p(target) under dist, (N,Z); the Gaussian's mean learns by squared error, its std by the NLL around
        the detached mean."""
        if self.bins:  # the bin nearest the target's change
            k = torch.bucketize((target - dist[1]).clamp(-LIMIT, LIMIT), (self.centres[1:] + self.centres[:-1]) / 2)
            return F.cross_entropy(dist[0].transpose(1, 2), k, reduction="none")  # logits (N,B,Z), k (N,Z)
        mean, log_sigma = dist
        err = (target - mean).pow(2)
        return err + 0.5 * err.detach() / (2 * log_sigma).exp() + log_sigma

    def mean(self, dist):
        """The expected next z (N,Z)."""
        return dist[1] + torch.softmax(dist[0], -1) @ self.centres if self.bins else dist[0]

    def sample(self, dist, tau):
        """A next z (N,Z) at temperature tau (Ha's: logits / tau; the Gaussian's spread * sqrt(tau))."""
        if self.bins:
            return dist[1] + self.centres[torch.distributions.Categorical(logits=dist[0] / tau).sample()]  # (N,Z)
        mean, log_sigma = dist
        return mean + log_sigma.exp() * math.sqrt(tau) * torch.randn_like(mean)


def steps_of(latents, holdout=20, death_steps=1):
    """Every step t of the encoded episodes, training and held out (M's split): z_t, z_{t-1} (z_0 at t = 0), a_t,
    win_t, death_t (mdnrnn.load_sequences's labels), z_{t+1} (z_t at the end: has_next 0), left (steps after t)."""
    names = sorted(f for f in os.listdir(latents) if f.endswith(".npz")) if os.path.isdir(latents) else []
    if len(names) < holdout:
        fail(f"{latents}: expected at least {holdout} episodes encoded by mdnrnn.py (.npz files), found {len(names)}")
    cols = [{k: [] for k in ("z", "z_last", "a", "win", "death", "z_next", "has_next", "left")} for _ in range(2)]
    for i, name in enumerate(names):
        ep, col = read_latents(os.path.join(latents, name), ("mu", "action", "reward", "done")), cols[
            i % holdout == holdout - 1]
        mu, T = torch.from_numpy(ep["mu"].astype(np.float32)), len(ep["action"])  # (T,Z): the frames actions met
        dead = ep["done"][-1] and ep["reward"].sum() <= 0 and T < MAX_STEPS  # CRUCIAL: done also ends wins and caps
        col["z"].append(mu)
        col["z_last"].append(torch.cat([mu[:1], mu[:-1]]))  # (T,Z)
        col["a"].append(torch.from_numpy(ep["action"].astype(np.int64)))
        col["win"].append(torch.from_numpy((ep["reward"] > 0).astype(np.float32)))
        col["death"].append((torch.arange(T) >= T - death_steps).float() * float(dead))
        col["z_next"].append(torch.cat([mu[1:], mu[-1:]]))  # (T,Z)
        col["has_next"].append((torch.arange(T) < T - 1).float())
        col["left"].append(torch.arange(T - 1, -1, -1))
    return [{k: torch.cat(v) for k, v in c.items()} for c in cols]


def losses(model, D, i, unroll):
    """Mean loss of windows starting at steps i (B,), unroll steps each, fed the model's own predictions after the
    first (the Gaussian's mean, with its gradient; a categorical sample at tau 1, as the dream feeds it)."""
    z, z_last, total = D["z"][i], D["z_last"][i], 0.0
    for j in range(unroll):
        dist, win, death = model(z, z_last, D["a"][i + j])
        total = total + ((model.nll(dist, D["z_next"][i + j]).sum(-1) * D["has_next"][i + j]).mean()
                         + F.binary_cross_entropy_with_logits(win, D["win"][i + j])
                         + F.binary_cross_entropy_with_logits(death, D["death"][i + j])) / unroll
        z_last, z = z, dist[0] if model.gaussian else model.sample(dist, 1.0).detach()
    return total


def grid_held_out(model, T):
    """The one-step error of the expected next z beside copying z, and the heads' AUCs, on the held-out steps."""
    dist, win, death = model(T["z"], T["z_last"], T["a"])
    sq = lambda x: ((T["z_next"] - x).pow(2).sum(-1) * T["has_next"]).sum().item() / T["has_next"].sum().item()
    row = dict(error=sq(model.mean(dist)), copy_error=sq(T["z"]), win_auc=auc(win.numpy(), T["win"].numpy()),
               death_auc=auc(death.numpy(), T["death"].numpy()))
    return row, (f"one-step error {row['error']:.2f} (copying z: {row['copy_error']:.2f}), win AUC "
                 f"{row['win_auc']:.3f}, death AUC {row['death_auc']:.3f}")


def train_grid(cfg):
    torch.manual_seed(cfg.seed)
    D, T = steps_of(os.path.join(cfg.run, "latents"), death_steps=cfg.death_steps)
    model = code_model(D, cfg) if cfg.codes else GridModel(D["z"].shape[1], cfg.width, cfg.bins)
    return fit(model, D, T, cfg, losses, grid_held_out, "grid")


@torch.no_grad()
def grid_dream(model, mdn, policy, z0, tau=1.0, max_steps=MAX_STEPS):
    """The grid model's dream (dream_bench's kind): policy(z (n,Z), h (n,H), the death head's logit of UP (n,),
    idx (n,)) -> action indices (n,). -> returns (N,) (10 per win), lengths (N,)."""
    z, z_last = z0.clone(), z0.clone()  # (N,Z) each; the first step has no earlier frame: z0 stands in

    def step(idx, h):
        zi, zli = z[idx], z_last[idx]
        a = policy(zi, h, model.death(zi, zli, torch.full((len(idx),), UP)), idx)  # (n,)
        dist, win, death = model(zi, zli, a)
        z_last[idx], z[idx] = zi, model.sample(dist, tau)
        return zi, a, win, death
    return dream_loop(step, mdn, len(z0), max_steps)


def grid_frames(model, vae, tau):
    """write_strip's dream_frames for the grid model: V's decoding of its dream at tau (no heads)."""
    def frames(z0, actions):
        z, z_last, dreamt = z0, z0, [z0]
        for a in actions:
            z_last, z = z, model.sample(model(z, z_last, a)[0], tau)
            dreamt.append(z)
        return decode(vae, torch.stack(dreamt, 1).flatten(0, 1)).reshape(len(z0), -1, 64, 64, 3)  # (n,T,64,64,3)
    return frames


def main(cfg):
    vae, mdn = load_vae(os.path.join(cfg.run, "vae.pt")), load_mdnrnn(os.path.join(cfg.run, "mdnrnn.pt"))
    if not vae.spatial:
        fail(f"{cfg.run}/vae.pt has a flat z; the grid model reads V's 8x8 grid (--spatial)")
    model, res = train_grid(cfg)
    res["constant"] = constant_table(grid_dream, model, mdn, first_z(vae, cfg.episodes, cfg, 1_000_003), cfg)
    if cfg.strip:
        write_strip(vae, cfg, cfg.strip, grid_frames(model, vae, cfg.tau))
    if cfg.generations:
        res["search"] = search_c(model, vae, mdn, cfg, grid_dream)
    return res


if __name__ == "__main__":
    torch.set_num_threads(os.cpu_count() or 1)
    main(cli(ProbeConfig))
