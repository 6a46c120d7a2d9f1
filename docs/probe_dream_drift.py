"""Probe: where does the frog dream part from the game? The same actions, played in the game and dreamt from the same
first frame, step by step.

The frog dream (docs/probe_frog_dream.py) kills a dream frog only by M's hop head, which reads the dreamt level's z.
Here C's start rule ("UP iff the hop head's logit < thr, else wait", danger.start_point) plays held-out levels in the
game; every episode's actions are then replayed open-loop in the dream from V's z of its first frame (the level moved
by its mean, the frog's likeliest move). Binned by the step t, printed: the hop head's AUC for "this UP is the
episode's last before its death" read from the real z and from the dreamt z, its mean P(death) from each against the
real rate, how far the dreamt frog is from the real one, and how far the frog that V would find in the dreamt z (the
locator) is from the dreamt frog (the hop head sees only the first; the win and the frog's moves follow the second),
and how far the real and the dreamt z lie from the real z's mean (C reads z too: is the dream's z as spread?).

    python docs/probe_dream_drift.py --run runs --model frog.pt --distribution-mode hard
"""
import os
import sys
from dataclasses import dataclass
from typing import Literal

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo's modules
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # and the probes beside it
from collect import ACTIONS, MAX_STEPS, NONE, UP, check_flags, cli, fail  # noqa: E402
from controller import Agent, input_sizes  # noqa: E402
from danger import auc, start_point  # noqa: E402
from evaluate import play  # noqa: E402
from mdnrnn import load_mdnrnn  # noqa: E402
from probe_frog import frog_of, imagined  # noqa: E402
from probe_frog_dream import load_frog  # noqa: E402
from vae import load_vae, to_input  # noqa: E402

BINS = (1, 10, 25, 50, 100, 500)  # the steps' bins: [1, 10), [10, 25), ...


@dataclass
class DriftConfig:
    run: str = "runs"  # directory holding vae.pt and mdnrnn.pt (with a hop head)
    model: str = "frog.pt"  # the frog model (docs/probe_frog_dream.py --model), trained on this run
    distribution_mode: Literal["easy", "hard"] = "easy"  # procgen difficulty (the run's)
    episodes: int = 500  # held-out levels played by the rule, then dreamt
    threshold: float = -1.0  # the rule: UP iff the hop head's logit < threshold (train.py --start-threshold)
    seed: int = 1_000_003  # level stream (evaluate.py's held-out one)

    def __post_init__(self):
        check_flags(self, at_least=dict(episodes=1))


def chunked(f, *xs, batch=4096):
    """f(*xs) computed on batch rows at a time (the convs' activations of every step at once would take gigabytes)."""
    return torch.cat([f(*(x[i:i + batch] for x in xs)) for i in range(0, len(xs[0]), batch)])


def rule_games(vae, mdn, episodes, seed, distribution_mode, threshold=-1.0):
    """C's start rule on M's hop head plays the first levels of seed's stream -> returns (E,), the recorded games
    (evaluate.play's, each with died: ended without the win before the game's cap)."""
    sizes = input_sizes("zhm", vae.z_dim, mdn.hidden)
    x0 = start_point(len(ACTIONS) * (sum(sizes.values()) + 1), "zhm", 1.0, threshold)  # (5,F+1)
    ret, length, games = play(Agent(vae, mdn, torch.as_tensor(x0), "zhm"), episodes, seed, distribution_mode,
                              record=True, desc="rule")
    for e, r, n in zip(games, ret, length):
        e["died"] = r <= 0 and n < MAX_STEPS
    return ret, games


@torch.no_grad()
def replay(vae, mdn, model, episodes):
    """Each episode's steps, in the game and in the open-loop dream: a dict of (N,T) tensors, padded past each end
    (alive False): alive, action indices a, last_up (the episode's last UP, which ended it without the win), the
    hop head's logit of UP on the real and the dreamt z, the frog's real and dreamt centres (..,2), the locator's
    reading of the dreamt z (..,2), and how far the real and the dreamt z are from the real z's mean (C reads z)."""
    n, T = len(episodes), max(len(e["action"]) for e in episodes)
    index = {int(p): i for i, p in enumerate(ACTIONS)}  # procgen id -> action index
    z = torch.zeros(n, T, vae.z_dim)  # (N,T,Z) V's z of the real frames, zero past the end
    a, alive = torch.full((n, T), NONE), torch.zeros(n, T, dtype=torch.bool)
    real_pos, last_up = torch.zeros(n, T, 2), torch.zeros(n, T, dtype=torch.bool)
    for i, e in enumerate(episodes):
        t = len(e["action"])
        z[i, :t], alive[i, :t] = chunked(lambda o: vae.encode(to_input(o))[0], e["obs"]), True
        a[i, :t] = torch.tensor([index[int(p)] for p in e["action"]])
        real_pos[i, :t] = torch.from_numpy(frog_of(e["obs"]))
        ups = (a[i, :t] == UP).nonzero()[:, 0]
        if e["died"] and len(ups):
            last_up[i, ups[-1]] = True
    zs, pos = imagined(model, z[:, 0], list(a.T), tau=0, level="mean")  # (N,T+1,Z), (N,T+1,2): from the first frame
    zs, pos = zs[:, :T], pos[:, :T]  # step t's dreamt state, before action t
    up = torch.full((n * (T - 1),), UP)

    def hop(zz):  # (N,T,Z) -> the logit of UP at each step t >= 1, from z_t and z_{t-1}: (N,T), step 0 nan
        logit = chunked(mdn.hop, zz[:, 1:].flatten(0, 1), zz[:, :-1].flatten(0, 1), up).view(n, T - 1)
        return torch.cat([torch.full((n, 1), float("nan")), logit], 1)
    centre = z[alive].mean(0)  # (Z,) the real z's mean over every step: the spreads below are taken around it
    return dict(alive=alive, a=a, last_up=last_up, real=hop(z), dreamt=hop(zs), real_pos=real_pos, pos=pos,
                located=chunked(model.locate, zs.flatten(0, 1)).view(n, T, 2), spread=(z - centre).norm(dim=-1),
                spread_dreamt=(zs - centre).norm(dim=-1))


def hop_starts(r):
    """replay's dict -> (N,T) True at the UPs that start a hop (the real frog at rest; step 0 has no logit)."""
    rest = torch.cat([torch.zeros_like(r["alive"][:, :1]), (r["real_pos"][:, 1:] - r["real_pos"][:, :-1]).abs()
                      .sum(-1) < 0.5], 1)  # (N,T) the real frog at rest: an UP there starts a hop
    return r["alive"] & (r["a"] == UP) & rest


def shift(r):
    """The shift b of the hop head's logit on the dreamt z that makes its mean P(death) over the UPs that start a hop
    equal to its mean on the real z of the same UPs (bisection): the dream's drift toward death taken back."""
    m = hop_starts(r)
    if not m.any():
        fail("no UP started a hop in the replayed games: nothing to calibrate on (play more levels)")
    dreamt, target = r["dreamt"][m], torch.sigmoid(r["real"][m]).mean()
    lo, hi = -20.0, 20.0
    for _ in range(60):  # the mean of sigmoid(dreamt + b) rises with b
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if torch.sigmoid(dreamt + mid).mean() < target else (lo, mid)
    return (lo + hi) / 2


def calibrated(vae, mdn, model, levels, distribution_mode, seed=5_000_011):
    """The rule's games on `levels` levels of seed's stream (training levels: no test plays them), replayed in the
    frog dream of model -> dict(shift: the shift of the dreamt z's hop logit, calibration_steps: real env steps)."""
    games = rule_games(vae, mdn, levels, seed, distribution_mode)[1]
    res = dict(shift=shift(replay(vae, mdn, model, games)), calibration_steps=sum(len(g["action"]) for g in games))
    print(f"the dreamt z's hop logit shifted by {res['shift']:+.2f} (the rule's games on {levels} levels of seed "
          f"{seed}, {res['calibration_steps']:,} real env steps)")
    return res


def table(r):
    """The drift, binned by step: one printed row per bin, returned as a list of dicts."""
    moves = hop_starts(r)  # (N,T)
    t = torch.arange(r["alive"].shape[1]).expand_as(moves)
    rows = []
    print(f"{'steps':>9} {'UPs':>5} {'AUC real':>8} {'dreamt':>6} {'P real':>6} {'dreamt':>6} {'rate':>5} "
          f"{'frog off':>8} {'z frog off':>10} {'z spread':>8} {'dreamt':>6}")
    for lo, hi in zip(BINS, BINS[1:]):
        m, live = moves & (t >= lo) & (t < hi), r["alive"] & (t >= lo) & (t < hi)  # (N,T) each
        if not m.any():
            continue
        y = r["last_up"][m].numpy()
        row = dict(steps=(lo, hi), ups=int(m.sum()), auc_real=auc(r["real"][m].numpy(), y),
                   auc_dreamt=auc(r["dreamt"][m].numpy(), y), p_real=torch.sigmoid(r["real"][m]).mean().item(),
                   p_dreamt=torch.sigmoid(r["dreamt"][m]).mean().item(), rate=float(y.mean()),
                   frog_off=(r["pos"] - r["real_pos"])[live].norm(dim=-1).mean().item(),
                   z_frog_off=(r["located"] - r["pos"])[live].norm(dim=-1).mean().item(),
                   spread=r["spread"][live].mean().item(), spread_dreamt=r["spread_dreamt"][live].mean().item())
        rows.append(row)
        print(f"{f'{lo}-{hi - 1}':>9} {row['ups']:>5} {row['auc_real']:>8.3f} {row['auc_dreamt']:>6.3f} "
              f"{row['p_real']:>6.1%} {row['p_dreamt']:>6.1%} {row['rate']:>5.1%} {row['frog_off']:>6.1f}px "
              f"{row['z_frog_off']:>8.1f}px {row['spread']:>8.1f} {row['spread_dreamt']:>6.1f}")
    return rows


def main(cfg):
    vae, mdn = load_vae(os.path.join(cfg.run, "vae.pt")), load_mdnrnn(os.path.join(cfg.run, "mdnrnn.pt"))
    if mdn.hop is None:
        fail(f"{cfg.run}/mdnrnn.pt has no hop head (M trained with --hop-steps 0): the rule and the dream need one")
    if not os.path.exists(cfg.model):
        fail(f"--model {cfg.model}: no such file (train one with docs/probe_frog_dream.py --model {cfg.model})")
    model = load_frog(cfg.model, vae.z_dim)[0]
    ret, episodes = rule_games(vae, mdn, cfg.episodes, cfg.seed, cfg.distribution_mode, cfg.threshold)
    print(f"{cfg.run}: the rule (UP iff the hop head's logit < {cfg.threshold:g}) wins {(ret > 0).mean():.1%} of "
          f"{cfg.episodes} {cfg.distribution_mode} levels; its actions replayed in the frog dream of {cfg.model}")
    r = replay(vae, mdn, model, episodes)
    rows = table(r)
    print(f"the shift of the dreamt z's hop logit that takes its mean P(death) back to the real z's: {shift(r):+.2f}")
    return rows


if __name__ == "__main__":
    torch.set_num_threads(os.cpu_count() or 1)
    main(cli(DriftConfig))
