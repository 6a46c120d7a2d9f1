"""Probe: can ANY linear C on [z, h] beat always-UP, given this run's V and M?

CMA-ES ends at always-UP in every configuration we tried. This probe asks whether a better linear
controller even exists on these features, without CMA-ES: it records the look-ahead ceiling of
docs/probe_lookahead.py (which cheats by cloning the game state and wins ~97% in easy mode) on training
levels, fits C's weights to imitate it (softmax regression on V's z and M's h), then plays that C
on held-out levels with its UP bias raised step by step, beside always-UP on the same levels.

    python docs/probe_linear_c.py --run runs/easy-default --episodes 300 --test-episodes 200
"""
import os
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo's modules
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # docs/, for the look-ahead probe
from collect import ACTIONS, UP, cli  # noqa: E402
from controller import Agent, features  # noqa: E402
from evaluate import Always, play, summarize  # noqa: E402
from mdnrnn import load_mdnrnn  # noqa: E402
from probe_lookahead import lookahead  # noqa: E402
from vae import encode, load_vae  # noqa: E402


INDEX = {int(a): i for i, a in enumerate(ACTIONS)}  # procgen action id -> action index


@dataclass
class ProbeConfig:
    run: str = "runs/easy-default"  # run dir with vae.pt and mdnrnn.pt
    distribution_mode: str = "easy"  # game mode of the run
    episodes: int = 300  # look-ahead episodes to imitate (training levels, seed 5)
    test_episodes: int = 200  # held-out levels (the evaluation seed) each fitted C plays
    inputs: str = "zh,h"  # comma-separated feature sets to try (z, zh, h)
    seed: int = 0  # seeds torch


def memory(vae, mdn, episodes):
    """z (mu), h and c before each action of every recorded episode, stacked: (N,Z), (N,H), (N,H)."""
    zs, hs, cs = [], [], []
    with torch.no_grad():
        for ep in episodes:
            z = torch.from_numpy(encode(vae, ep["obs"])[0]).float()  # (T,Z)
            state = (torch.zeros(1, 1, mdn.hidden), torch.zeros(1, 1, mdn.hidden))  # (h, c), each (1,1,H)
            for t, a in enumerate(ep["action"]):
                zs.append(z[t])
                hs.append(state[0][0, 0])
                cs.append(state[1][0, 0])
                state = mdn.advance(z[t:t + 1], torch.tensor([INDEX[int(a)]]), state)
    return torch.stack(zs), torch.stack(hs), torch.stack(cs)


def fit(X, y, train, steps=1500, l2=1e-4):
    """Softmax regression on standardised X (N,D) -> C's weights (5,D+1) in raw feature units."""
    m, s = X[train].mean(0), X[train].std(0) + 1e-3
    W = torch.zeros(len(ACTIONS), X.shape[1] + 1, requires_grad=True)
    opt = torch.optim.Adam([W], lr=0.01)
    Xn = (X - m) / s  # (N,D)
    for _ in range(steps):
        loss = F.cross_entropy(Xn[train] @ W[:, :-1].T + W[:, -1], y[train]) + l2 * W.pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        acc = ((Xn[~train] @ W[:, :-1].T + W[:, -1]).argmax(1) == y[~train]).float().mean().item()
        w = W[:, :-1] / s  # (x - m) / s @ w = x @ (w / s) - (m / s) @ w
        b = W[:, -1] - (m / s) @ W[:, :-1].T
    return torch.cat([w, b[:, None]], 1), acc  # (5,D+1)


if __name__ == "__main__":
    cfg = cli(ProbeConfig)
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(os.cpu_count() or 1)
    vae, mdn = load_vae(os.path.join(cfg.run, "vae.pt")), load_mdnrnn(os.path.join(cfg.run, "mdnrnn.pt"))
    returns, lengths, episodes = play(lookahead(cfg.distribution_mode), cfg.episodes, 5, cfg.distribution_mode,
                                      record=True, desc="look-ahead")
    print(f"look-ahead on {cfg.episodes} training levels: {summarize(returns, lengths)['win_rate']:.1%} wins")
    z, h, c = memory(vae, mdn, episodes)
    y = torch.tensor([INDEX[int(a)] for ep in episodes for a in ep["action"]])  # (N,)
    train = torch.from_numpy(np.concatenate([np.full(len(ep["action"]), k % 5 != 4) for k, ep in enumerate(episodes)]))
    print(f"{len(y)} steps; the look-ahead's actions: " + ", ".join(f"{n} {f:.0%}" for n, f in zip(
        ("LEFT", "DOWN", "none", "UP", "RIGHT"), np.bincount(y.numpy(), minlength=len(ACTIONS)) / len(y))))
    test_seed = 1_000_003
    up = summarize(*play(Always(), cfg.test_episodes, test_seed, cfg.distribution_mode, desc="always-UP"))
    print(f"always-UP on {cfg.test_episodes} held-out levels: {up['win_rate']:.1%}")
    for inputs in cfg.inputs.split(","):
        X = features(z, h, inputs)  # (N,n_features)
        weights, acc = fit(X, y, train)
        majority = (y[~train] == y[train].mode().values).float().mean().item()
        print(f"C on {inputs}: imitation accuracy {acc:.1%} on held-out episodes (majority action {majority:.1%})")
        for delta in (0, 0.5, 1, 2, 3, 4):
            w = weights.clone()
            w[UP, -1] += delta  # push C towards UP: imitation alone waits too often
            r = summarize(*play(Agent(vae, mdn, w, inputs, distribution_mode=cfg.distribution_mode), cfg.test_episodes,
                                test_seed, cfg.distribution_mode, desc=f"C {inputs} +{delta}"))
            print(f"  UP bias +{delta}: {r['win_rate']:.1%} wins, {r['mean_length']:.0f} steps per episode")
