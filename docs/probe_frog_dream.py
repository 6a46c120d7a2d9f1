"""Probe: the frog as an object of the dream. Does a world model that carries the frog's place as a variable of its
own dream a game where UP matters, and does C learn in it?

The dream's state is V's z (the level, moved by probe_grid_dream's Gaussian conv transition) plus the frog's centre
(y, x) in pixels (on V's grid alone the dreamt frog blurs: experiments.md, 16th round). The frog model (3x3 convs on
V's grid, each cell told the frog's offset from it, its last move and the action) gives the frog's next move as one of
9 x 9 moves of -4..4 pixels and the logits of "this step wins" and "this step kills"; its first place comes from a
locator on V's z, taught by the frog's colour (docs/probe_frog.py's cheat, for labels only). --level mean moves the
level by its mean; --follow tells it where the frog goes; --death hop: a dream frog dies only as a move starts, by M's
hop head (C's m, in dream and game); hop-wait: also while it waits; --calibrate N shifts that head's logit on the
dreamt z by the drift measured on N training levels (probe_dream_drift.calibrated), --shift by hand. Printed:
held-out figures, with --hop-steps AUCs on hop-then-wait UPs, dreams under constant actions, a hop real and dreamt,
C searched in it.

    python docs/probe_frog_dream.py --run runs --level mean --death hop --tau 0.3 --generations 30
"""
import dataclasses
import functools
import os
import sys
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo's modules
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # and the probes beside it
from collect import MAX_STEPS, NONE, UP, check_flags, cli, fail  # noqa: E402
from danger import auc  # noqa: E402
from dream_bench import constant_table, dream_loop, first_z, fit, search_c, write_strip  # noqa: E402
from mdnrnn import load_mdnrnn  # noqa: E402
from probe_frog import Located, death_aucs, frog_course, frog_frames, frog_steps, imagined  # noqa: E402
from probe_grid_dream import GridModel, steps_of  # noqa: E402
from vae import load_checkpoint, load_vae, save_atomic  # noqa: E402

MOVE = 4  # the frog moves at most 4 pixels a step per axis (a hop: ~7 over ~5 frames; 300 random episodes: 4.1 at most)
K = 2 * MOVE + 1  # moves per axis: the frog model's K*K classes
CENTRES = torch.stack(torch.meshgrid(torch.arange(8) * 8 + 3.5, torch.arange(8) * 8 + 3.5, indexing="ij"), -1
                      ).view(64, 2)  # (64,2) the (y, x) centre of each of V's 8x8-pixel cells, in V's cell order


@dataclasses.dataclass
class ProbeConfig:
    run: str = "runs"  # directory holding data/ (the frames), vae.pt, mdnrnn.pt (C's h) and latents/
    distribution_mode: Literal["easy", "hard"] = "easy"  # procgen difficulty (the run's)
    steps: int = 3000  # gradient steps of the level's transition, the frog model and the locator
    unroll: int = 6  # training windows: both models fed their own predictions this many steps (1: one-step)
    batch: int = 64  # windows per gradient step
    width: int = 64  # channels of the convs
    death_steps: int = 2  # the last this many steps of a dying episode are labelled death (the car comes first)
    tau: float = 1.0  # the dream's temperature: the level's Gaussian spread * sqrt(tau), the frog's logits / tau
    level: Literal["sample", "mean"] = "sample"  # the level's next z: sampled at tau (Ha's), or the mean (cars: alike)
    death: Literal["step", "hop", "hop-wait"] = "step"  # what kills a dream frog: the frog model's death head each
    # step; M's hop head as a move starts (C's m: its logit of UP, dream and game); hop-wait: also while it waits
    follow: bool = False  # the level's transition reads the frog's place now and next (the frog in z moves with it)
    calibrate: int = 0  # > 0: the dreamt z's hop logit shifted by its drift measured on this many training levels
    shift: float = 0.0  # added to the dreamt z's hop logit (C's m and the deaths there; > 0: deadlier), after that
    hop_steps: int = 0  # > 0: env steps of hop-then-wait play on new levels; the death logit's AUC on its UPs (M's too)
    episodes: int = 256  # dreams per constant action, from held-out first frames
    generations: int = 0  # CMA-ES generations of C in the dream (0: no search)
    inputs: Literal["zhm", "hm", "m"] = "zhm"  # what the searched C reads: [z, h, m] (the agent's) or without z or h
    popsize: int = 32  # candidates per generation
    dream_episodes: int = 64  # dreams per candidate per generation, from new levels' first frames
    max_steps: int = 250  # a dream episode's cap in the search (the game's: 500)
    check_levels: int = 64  # real validation levels the CMA mean plays every 5 generations
    test_episodes: int = 1000  # held-out levels the searched C plays at the end (evaluate.py's stream)
    model: str = ""  # a .pt of the frog model: loaded if it exists (training skipped), else written after training
    strip: str = ""  # a PNG to write: 4 dreams (V's picture, the dreamt frog in magenta) beside the real game's frames
    seed: int = 0  # seeds the models' training, the dreams and CMA-ES
    search_seed: int = -1  # >= 0: seeds C's search (its dreams and CMA-ES) apart from the frog model (-1: --seed)

    def __post_init__(self):
        check_flags(self, at_least=dict(steps=1, unroll=1, batch=1, width=2, death_steps=1, hop_steps=0, episodes=1,
                                        generations=0, search_seed=-1, calibrate=0, popsize=2, dream_episodes=1,
                                        max_steps=1, check_levels=1, test_episodes=1), above=dict(tau=0))


def move_class(delta):
    """Moves (N,2) in pixels -> the nearest of the K*K classes (N,), moves beyond MOVE clipped."""
    k = delta.round().clamp(-MOVE, MOVE).long() + MOVE  # (N,2) in 0..K-1
    return k[:, 0] * K + k[:, 1]


class FrogModel(nn.Module):
    """The dream's world: V's z of the level moved by a Gaussian conv transition (GridModel's), the frog moved by a
    categorical over K*K moves, the win and death logits read off the frog's place on the level; and the locator,
    which finds the frog in V's z."""

    def __init__(self, z_dim, width=64, n_actions=5, follow=False):
        super().__init__()
        self.c, self.n_actions, self.follow = z_dim // 64, n_actions, follow
        self.grid = GridModel(z_dim, width, extra=4 * follow)  # the level's next z (its win and death heads unused)
        self.trunk = nn.Sequential(  # (N,2c+4+A,8,8) -> (N,256)
            nn.Conv2d(2 * self.c + 4 + n_actions, width, 3, 1, 1), nn.ReLU(), nn.Conv2d(width, width, 3, 1, 1),
            nn.ReLU(), nn.Flatten(), nn.Linear(width * 64, 256), nn.ReLU())
        self.out = nn.Linear(256, K * K + 2)  # the move's logits, win, death
        self.locator = nn.Sequential(  # (N,c,8,8) -> (N,3,8,8): per cell "the frog is here" and its offset (y, x)
            nn.Conv2d(self.c, width, 3, 1, 1), nn.ReLU(), nn.Conv2d(width, width, 3, 1, 1), nn.ReLU(),
            nn.Conv2d(width, 3, 3, 1, 1))

    def forward(self, z, z_last, pos, pos_last, a):
        """V's z, z_last (N,Z), the frog's centre now and a step ago (N,2), action indices (N,) -> the logits of the
        frog's move (N,K*K), of the win (N,) and of the death (N,)."""
        n, rel = len(z), (pos[:, None] - CENTRES) / 8  # (N,64,2): the frog's offset from each cell, in cells
        planes = torch.cat([rel.transpose(1, 2), ((pos - pos_last) / MOVE)[..., None].expand(-1, -1, 64),
                            F.one_hot(a, self.n_actions).float()[..., None].expand(-1, -1, 64)], 1)  # (N,4+A,64)
        x = torch.cat([z.view(n, self.c, 8, 8), z_last.view(n, self.c, 8, 8), planes.view(n, -1, 8, 8)], 1)
        y = self.out(self.trunk(x))  # (N,K*K+2)
        return y[:, :-2], y[:, -2], y[:, -1]

    def z_dist(self, z, z_last, a, pos, pos_next):
        """The level's next z: the Gaussian's mean and log std (N,Z) each; with follow it reads where the frog is now
        and where it goes, pos and pos_next (N,2), as each cell's offset from them (N,4,8,8)."""
        mean = self.grid.move(z, z_last, a, torch.cat([(p[:, None] - CENTRES).transpose(1, 2) / 8 for p in (
            pos, pos_next)], 1).view(len(z), 4, 8, 8) if self.follow else None)  # (N,2,64) x2 -> (N,4,64) -> (N,4,8,8)
        return mean, self.grid.log_sigma.clamp(-5, 2).expand_as(mean)

    def locate(self, z, pos=None):
        """V's z (N,Z) -> the frog's centre (N,2); with the true centre pos (N,2): the locator's loss instead."""
        y = self.locator(z.view(len(z), self.c, 8, 8)).flatten(2)  # (N,3,64)
        cell = y[:, 0].argmax(1) if pos is None else (pos[:, None] - CENTRES).pow(2).sum(-1).argmin(1)  # (N,)
        off = MOVE * torch.tanh(y[:, 1:].gather(2, cell[:, None, None].expand(-1, 2, 1))[..., 0])  # (N,2) pixels
        return CENTRES[cell] + off if pos is None else (F.cross_entropy(y[:, 0], cell)
                                                        + (CENTRES[cell] + off - pos).pow(2).sum(-1).mean() / MOVE ** 2)

    def step(self, pos, logits, tau=1.0):
        """The frog's next centre (N,2): a move sampled at tau (logits / tau; 0: the likeliest), kept on screen."""
        k = logits.argmax(1) if tau == 0 else torch.distributions.Categorical(logits=logits / tau).sample()  # (N,)
        return (pos + torch.stack([k // K, k % K], 1) - MOVE).clamp(0, 63)

    def imagine(self, z, z_last, pos, pos_last, a, tau=1.0, level="sample"):
        """One dreamt step from (z, z_last, pos, pos_last) under actions a (N,) -> this step's win and death logits
        (N,) each, the next z (N,Z) and the frog's next centre (N,2); tau 0 with level "mean": the likeliest step."""
        logits, win, death = self(z, z_last, pos, pos_last, a)
        pos_next = self.step(pos, logits, tau)
        dist = self.z_dist(z, z_last, a, pos, pos_next)  # the level's next z: the Gaussian's mean, or sampled at tau
        return win, death, dist[0] if level == "mean" else self.grid.sample(dist, tau), pos_next

    def risk(self, z, z_last, pos, pos_last, a, lookahead=0):
        """C's m (N,): the death logit of action a now, or with lookahead L the logit of P(the frog dies within L
        steps of a, then NONE) as the model imagines it (the level's mean, the frog's likeliest move each step)."""
        if not lookahead:
            return self(z, z_last, pos, pos_last, a)[2]
        alive, dead = torch.ones(len(z)), torch.zeros(len(z))
        for t in range(lookahead):
            act = a if t == 0 else torch.full_like(a, NONE)
            _, death, z_next, pos_next = self.imagine(z, z_last, pos, pos_last, act, 0, "mean")
            dead, alive = dead + alive * torch.sigmoid(death), alive * torch.sigmoid(-death)
            z_last, z, pos_last, pos = z, z_next, pos, pos_next
        return torch.logit(dead.clamp(1e-6, 1 - 1e-6))

    def hop(self, z, z_last, a, lookahead=0):
        """risk from V's z alone (the locator finds the frog): C's m in the real game."""
        return self.risk(z, z_last, self.locate(z), self.locate(z_last), a, lookahead)


def losses(model, D, i, unroll):
    """Mean loss of windows from steps i (B,), unroll steps each: the level fed its own mean after the first (with its
    gradient), the frog its true place (teacher forcing). CRUCIAL: fed its own samples, the dreamt frog rose 6 pixels,
    then fell back to 2 (real: 7; probably steering to the frog V draws in z, left behind by the dreamt level)."""
    z, z_last, pos, pos_last = D["z"][i], D["z_last"][i], D["pos"][i], D["pos_last"][i]
    total = model.locate(D["z"][i], D["pos"][i])
    for j in range(unroll):
        a, has_next = D["a"][i + j], D["has_next"][i + j]
        dist = model.z_dist(z, z_last, a, pos, D["pos_next"][i + j])
        logits, win, death = model(z, z_last, pos, pos_last, a)
        target = move_class(D["pos_next"][i + j] - pos)  # (B,) where the frog went
        total = total + ((model.grid.nll(dist, D["z_next"][i + j]).sum(-1) * has_next).mean()
                         + (F.cross_entropy(logits, target, reduction="none") * has_next).mean()
                         + F.binary_cross_entropy_with_logits(win, D["win"][i + j])
                         + F.binary_cross_entropy_with_logits(death, D["death"][i + j])) / unroll
        z_last, z, pos_last, pos = z, dist[0], pos, D["pos_next"][i + j]
    return total


def held_out(model, T):
    """The models on the held-out steps, each from the true state: the locator's mean error in pixels, the share of
    moves whose most likely class is the true one (and staying put's share), the level's one-step error, AUCs."""
    logits, win, death = model(T["z"], T["z_last"], T["pos"], T["pos_last"], T["a"])
    target, m = move_class(T["pos_next"] - T["pos"]), T["has_next"] > 0
    mean = model.z_dist(T["z"], T["z_last"], T["a"], T["pos"], T["pos_next"])[0]
    row = dict(locator_px=(model.locate(T["z"]) - T["pos"]).pow(2).sum(-1).sqrt().mean().item(),
               move_acc=(logits.argmax(1) == target)[m].float().mean().item(),
               stay_acc=(target == move_class(torch.zeros(1, 2)))[m].float().mean().item(),
               error=((T["z_next"] - mean).pow(2).sum(-1) * T["has_next"]).sum().item() / T["has_next"].sum().item(),
               win_auc=auc(win.numpy(), T["win"].numpy()), death_auc=auc(death.numpy(), T["death"].numpy()))
    return row, (f"locator error {row['locator_px']:.2f} px, move accuracy {row['move_acc']:.1%} (staying put: "
                 f"{row['stay_acc']:.1%}), level's one-step error {row['error']:.2f}, win AUC {row['win_auc']:.3f}, "
                 f"death AUC {row['death_auc']:.3f}")


def train_frog(cfg):
    torch.manual_seed(cfg.seed)
    D, T = steps_of(os.path.join(cfg.run, "latents"), death_steps=cfg.death_steps)
    for split, frog in zip((D, T), frog_steps(cfg.run)):
        if len(frog["pos"]) != len(split["a"]):
            fail(f"{cfg.run}: data/ and latents/ hold different episodes ({len(frog['pos'])} vs {len(split['a'])} "
                 "steps): encode data/ again with mdnrnn.py")
        split.update(frog)
    return fit(FrogModel(D["z"].shape[1], cfg.width, follow=cfg.follow), D, T, cfg, losses, held_out, "frog")


def per_step(logit, window=8.5):
    """A waiting frog's death logit per step from the hop head's "NONE kills within a wait" (5-12 steps: 8.5 mean)."""
    log_live = F.logsigmoid(-logit) / window  # log(1 - p_step): 1 - p_step = (1 - p)^(1/window)
    return torch.log(-torch.expm1(log_live).clamp(max=-1e-12)) - log_live


@torch.no_grad()
def frog_dream(model, mdn, policy, z0, tau=1.0, max_steps=MAX_STEPS, level="sample", death="step", shift=0.0):
    """The frog model's dream (dream_bench's kind): policy(z (n,Z), h (n,H), the death logit of UP (n,), idx (n,))
    -> actions (n,); the frog starts where the locator finds it in z0; M's hop logit + shift on the dreamt z.
    -> returns (N,), lengths (N,)."""
    hop = lambda *x: mdn.hop(*x) + shift  # noqa: E731  (C's m and the dream's death, never the game's)
    pos = model.locate(z0)  # (N,2); the first step has no earlier frame: z0 and pos stand in
    z, z_last, pos_last = z0.clone(), z0.clone(), pos.clone()

    def step(idx, h):
        zi, zli, pi, pli = z[idx], z_last[idx], pos[idx], pos_last[idx]
        up = torch.full((len(idx),), UP)
        a = policy(zi, h, hop(zi, zli, up) if death != "step" else model(zi, zli, pi, pli, up)[2], idx)  # (n,)
        win, dies, z[idx], pos[idx] = model.imagine(zi, zli, pi, pli, a, tau, level)
        z_last[idx], pos_last[idx] = zi, pi
        if death != "step":  # M's hop head where a move starts from rest (mid-hop the game ignores the action), with
            # hop-wait also where the frog waits at rest (CRUCIAL: in hard mode a frog left in a lane or on a log dies)
            rest = (pi - pli).abs().sum(1) < 0.5  # (n,)
            judged = (rest & ((a != NONE) | (death == "hop-wait"))).nonzero()[:, 0]  # (j,)
            dies = torch.full_like(dies, -30.0)  # elsewhere never
            if len(judged):
                logit = hop(zi[judged], zli[judged], a[judged])  # (j,)
                dies[judged] = torch.where(a[judged] == NONE, per_step(logit), logit)
        return zi, a, win, dies
    return dream_loop(step, mdn, len(z0), max_steps)


def load_frog(path, z_dim):
    """A frog model written by trained() -> the model, its training flags (older files: no follow), its held-out row."""
    ckpt = load_checkpoint(path)
    was = {k: ckpt["config"].get(k, getattr(ProbeConfig, k)) for k in ("steps", "unroll", "batch", "width",
                                                                        "death_steps", "follow", "seed")}
    model = FrogModel(z_dim, was["width"], follow=was["follow"])
    model.load_state_dict(ckpt["model"])
    return model.eval(), was, dict(ckpt["held_out"])


def trained(cfg, z_dim):
    """The frog model of cfg.model if that file exists (made with the same training flags), else a new one trained
    and written there (when cfg.model is set). -> the model, its held-out figures."""
    if cfg.model and os.path.exists(cfg.model):
        model, was, row = load_frog(cfg.model, z_dim)
        if was != {k: getattr(cfg, k) for k in was}:  # what the training depends on
            fail(f"--model {cfg.model} was trained with other flags ({was}); use another --model")
        return model, row
    model, row = train_frog(cfg)
    if cfg.model:
        save_atomic(dict(model=model.state_dict(), config=dataclasses.asdict(cfg), held_out=row), cfg.model)
    return model, row


def main(cfg):
    vae, mdn = load_vae(os.path.join(cfg.run, "vae.pt")), load_mdnrnn(os.path.join(cfg.run, "mdnrnn.pt"))
    if not vae.spatial:
        fail(f"{cfg.run}/vae.pt has a flat z; the frog model reads V's 8x8 grid (--spatial)")
    if cfg.death != "step" and mdn.hop is None:
        fail(f"--death {cfg.death}: {cfg.run}/mdnrnn.pt has no hop head (M trained with --hop-steps 0)")
    if (cfg.calibrate or cfg.shift) and cfg.death == "step":
        fail("--calibrate and --shift move M's hop head, which --death step does not use: use --death hop or hop-wait")
    model, res = trained(cfg, vae.z_dim)
    if cfg.hop_steps:  # the test of "M knows death", on levels of a stream no training step saw
        res["hop_auc"] = death_aucs(model, mdn, vae, cfg.distribution_mode, cfg.hop_steps)
    if cfg.calibrate:  # imported here: the drift probe imports this module
        from probe_dream_drift import calibrated
        res.update(calibrated(vae, mdn, model, cfg.calibrate, cfg.distribution_mode))
    dream = functools.partial(frog_dream, level=cfg.level, death=cfg.death, shift=res.get("shift", 0.0) + cfg.shift)
    z_held = first_z(vae, cfg.episodes, cfg, 1_000_003)  # (E,Z) V's z of held-out first frames: the dreams start there
    res["constant"] = constant_table(dream, model, mdn, z_held, cfg)
    hop = [torch.full((cfg.episodes,), UP if t == 0 else NONE) for t in range(8)]  # one hop, then waiting
    res["hop_course"] = {k: (y[:, :1, 0] - y[:, 1:, 0]).median(0).values.tolist() for k, y in (  # (T,) each
        ("real", frog_course(cfg.distribution_mode, hop, 1_000_003)),
        ("dreamt", imagined(model, z_held, hop, cfg.tau, cfg.level)[1]))}
    print("UP from held-out first frames, then NONE: the frog's median rise in pixels at each step, " + "; ".join(
        f"{k} {' '.join(f'{v:.1f}' for v in rise)}" for k, rise in res["hop_course"].items()))
    if cfg.strip:
        write_strip(vae, cfg, cfg.strip, frog_frames(model, vae, cfg.tau, cfg.level))
    if cfg.generations:
        if cfg.search_seed >= 0:  # one frog model, another search: which of the two does a seed's result owe to?
            torch.manual_seed(cfg.search_seed)
            cfg = dataclasses.replace(cfg, seed=cfg.search_seed)
        m_head = Located(model) if cfg.death == "step" else mdn.hop  # C's m, in the dream and in the game
        res["search"] = search_c(model, vae, mdn, cfg, dream, m_head, cfg.inputs)
    return res


if __name__ == "__main__":
    torch.set_num_threads(os.cpu_count() or 1)
    main(cli(ProbeConfig))
