"""Evaluation of a trained World Models agent (V + M + C) on procgen leaper: its win rate on held-out
levels beside a random and an always-UP baseline (World Models, section 3.3: the agent's score over
many trials of the real environment), and pictures of what V sees and what M dreams (sections 3.1
and 3.4: reconstructions, and a rollout imagined by M at temperature tau).

Every policy plays the same levels: one procgen env per episode, each counting only its first
episode, whose level is fixed by --seed (the default differs from every training stream).

    python evaluate.py --run runs --episodes 1000 --json
"""
import json
import math
import os
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from tqdm import tqdm

from collect import ACTION_NAMES, ACTIONS, MAX_STEPS, UP, check_flags, cli, fail, interruptible, make_env, random_policy
from controller import Agent, choose, features, input_sizes
from danger import danger_logit, death_probe, load_danger
from mdnrnn import dream as mdn_dream
from mdnrnn import load_mdnrnn
from vae import encode, load_checkpoint, load_vae, reconstruction_grid, to_input

WIN = 10.0  # leaper pays 10 for reaching the finish line and nothing else
ID_NAMES = dict(zip(ACTIONS.tolist(), ACTION_NAMES))  # procgen action id -> name


@dataclass
class EvalConfig:
    run: str = "runs"  # directory holding vae.pt, mdnrnn.pt and controller.pt; pictures go here too
    episodes: int = 1000  # test episodes per policy, each on its own level
    seed: int = 1_000_003  # level stream of the test: differs from every training seed
    distribution_mode: Literal["", "easy", "hard"] = ""  # empty: the mode the controller was trained on
    json: bool = False  # print one JSON object with all the numbers as the last line of stdout
    pictures: bool = True  # write agent.gif, reconstructions.png, dream.gif and curves.png into --run
    gif_episodes: int = 4  # episodes played by the agent in agent.gif
    tau: float = 1.15  # temperature of M's dream in dream.gif (Ha: 1.15)
    death_steps: int = 50_000  # env steps of hop-then-wait play on --seed's levels: "does this UP kill?" AUC of D, V+M

    def __post_init__(self):
        check_flags(self, at_least=dict(episodes=1, gif_episodes=0, death_steps=0), above=dict(tau=0))


def load_agent(run_dir):
    """The agent of a run dir: run_dir/vae.pt, mdnrnn.pt, controller.pt and, when C reads it, danger.pt,
    checked to fit together."""
    paths = {name: os.path.join(run_dir, name + ".pt") for name in ("vae", "mdnrnn", "controller", "danger")}
    for name in ("vae", "mdnrnn", "controller"):
        if not os.path.exists(paths[name]):
            fail(f"--run {run_dir}: no {name}.pt in it (train it with {name}.py, --out {paths[name]})")
    vae, mdn, ckpt = load_vae(paths["vae"]), load_mdnrnn(paths["mdnrnn"]), load_checkpoint(paths["controller"])
    config, inputs = ckpt["config"], ckpt["config"]["inputs"]  # C's flags (mirror: only in files made since --mirror)
    n_features = sum(input_sizes(inputs, vae.z_dim, mdn.hidden).values())
    n_params = len(ACTIONS) * (n_features + 1)
    if (ckpt["z_dim"], ckpt["hidden"]) != (vae.z_dim, mdn.hidden) or ckpt["params"].numel() != n_params:
        fail(f"{paths['controller']}: trained for z_dim {ckpt['z_dim']}, hidden {ckpt['hidden']}, but "
             f"{paths['vae']} has z_dim {vae.z_dim} and {paths['mdnrnn']} hidden {mdn.hidden}")
    if "d" in inputs and not os.path.exists(paths["danger"]):
        fail(f"--run {run_dir}: its controller reads D, but there is no danger.pt (train it with danger.py)")
    danger = load_danger(paths["danger"]) if "d" in inputs else None
    ids = dict(vae=vae.id, mdnrnn=mdn.id, danger=danger.id if danger else None)
    for name, made_with in ckpt.get("made_from", {}).items():  # C, and the V, M and D it was trained with
        if ids[name] != made_with:
            fail(f"--run {run_dir}: {paths['controller']} was trained with another {name}.pt than the one there")
    weights = ckpt["params"].float().view(len(ACTIONS), -1)  # (5,n_features+1), bias last
    return Agent(vae, mdn, weights, inputs, danger, config["distribution_mode"], config.get("mirror", False))


class RandomPolicy:
    """Baseline: collect.py's random policy made uniform: each step, each env plays one of the 5
    actions with equal probability (no bias toward UP, no repeats)."""

    def __init__(self, seed):
        self.seed = seed

    def reset(self, num_envs):
        self.next = random_policy(np.random.default_rng(self.seed), num_envs, up_prob=1 / len(ACTIONS), max_repeat=1)

    def act(self, obs, first, alive=None):
        return ACTIONS[self.next()]


class Always:
    """Baseline: one action every step (the default, UP: hop forward)."""

    def __init__(self, action=UP):
        self.action = action  # an index into ACTIONS

    def reset(self, num_envs):
        pass

    def act(self, obs, first, alive=None):
        return np.full(len(obs), ACTIONS[self.action])


def play(policy, episodes, seed, distribution_mode, record=False, desc="play"):
    """One episode per env of one seeded ProcgenGym3Env: env i's level depends only on (seed, i),
    so every policy meets the same levels. Returns returns (E,) and lengths (E,); with record also
    per episode dict(obs uint8 (T,64,64,3), action procgen ids (T,))."""
    env = make_env(episodes, distribution_mode, seed=seed)
    policy.reset(episodes)
    if hasattr(policy, "bind"):
        policy.bind(env)  # only docs/probe_lookahead.py's ceiling needs the env itself, to clone its state
    _, obs, first = env.observe()  # first: all True
    alive, returns, lengths = np.ones(episodes, dtype=bool), np.zeros(episodes), np.zeros(episodes, dtype=np.int64)
    frames = [dict(obs=[], action=[]) for _ in range(episodes if record else 0)]
    for _ in tqdm(range(MAX_STEPS), desc=desc, unit="step", leave=False, disable=None):
        actions = policy.act(obs["rgb"], first, alive)  # (E,) procgen ids
        for i in np.flatnonzero(alive) if record else ():
            frames[i]["obs"].append(obs["rgb"][i])
            frames[i]["action"].append(actions[i])
        env.act(actions)
        rew, obs, first = env.observe()
        returns, lengths = returns + rew * alive, lengths + alive  # only each env's first episode counts
        # CRUCIAL: procgen auto-resets. When first[i] is set, rew[i] was the last reward of env i's
        # episode and obs[i] is already a new level: env i is done counting.
        alive &= ~first
        if not alive.any():
            break
    recorded = [dict(obs=np.stack(f["obs"]), action=np.array(f["action"])) for f in frames]  # [] unless record
    return (returns, lengths, recorded) if record else (returns, lengths)


def wilson(k, n, z=1.96):
    """95% Wilson score interval of a proportion k/n (sound at 0% and 100%, unlike p +- 2 std)."""
    if n == 0:
        return [0.0, 1.0]
    p, d = k / n, 1 + z * z / n
    center, half = (p + z * z / (2 * n)) / d, z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return [max(0.0, center - half), min(1.0, center + half)]


def summarize(returns, lengths):
    """Win rate (a win = reaching the finish: return 10) with its 95% interval, mean return and length."""
    returns, wins = np.asarray(returns, dtype=np.float64), int((np.asarray(returns) >= WIN).sum())
    return dict(win_rate=wins / max(len(returns), 1), wins=wins, episodes=len(returns), ci95=wilson(wins, len(returns)),
                mean_return=float(returns.mean()), mean_length=float(np.mean(lengths)))


def upscale(img, k=4):
    return img.repeat(k, 0).repeat(k, 1)  # nearest neighbour: (H,W,3) -> (kH,kW,3)


def caption(img, text, height=16):
    """img uint8 (H,W,3) with a black strip above it holding text: (H+height,W,3)."""
    from PIL import Image, ImageDraw
    canvas = Image.new("RGB", (img.shape[1], img.shape[0] + height))
    canvas.paste(Image.fromarray(img), (0, height))
    ImageDraw.Draw(canvas).text((4, 2), text, fill=(255, 255, 255))
    return np.asarray(canvas)


@torch.no_grad()
def decode(vae, z):
    """z (N,Z) -> V's frames, uint8 (N,64,64,3)."""
    return (vae.decode(z).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)  # (N,3,64,64) -> (N,64,64,3)


def save_gif(path, frames, duration):
    """frames uint8 (H,W,3) each, duration ms per frame. One shared 64-colour palette without
    dithering keeps still pixels still between frames: ~10x smaller than a palette per frame."""
    import imageio.v2 as imageio
    from PIL import Image
    sample = np.concatenate(frames[::max(len(frames) // 16, 1)], 0)  # (k*H,W,3)
    palette = Image.fromarray(sample).quantize(64, dither=Image.Dither.NONE)
    quantized = [Image.fromarray(f).quantize(palette=palette, dither=Image.Dither.NONE).convert("RGB") for f in frames]
    imageio.mimsave(path, [np.asarray(f) for f in quantized], duration=duration, loop=0)


def agent_gif(agent, recorded, path):
    """Each frame: the real frame | V's reconstruction, x4, with the action the agent chose."""
    gif = []
    for k, ep in enumerate(tqdm(recorded, desc="agent.gif", unit="ep", disable=None)):
        recon = decode(agent.vae, torch.from_numpy(encode(agent.vae, ep["obs"])[0]))  # from mu
        pairs = np.concatenate([ep["obs"], recon], 2)  # (T,64,128,3)
        for t, (img, a) in enumerate(zip(pairs, ep["action"])):
            gif.append(caption(upscale(img), f"episode {k + 1}  t={t}  {ID_NAMES[int(a)]}   real | V"))
    save_gif(path, gif, duration=50)


@torch.no_grad()
def dream_gif(agent, frame, tau, path, steps=100, tries=64, least=10):
    """M's dream (mdnrnn.dream) from one real frame, C acting, V decoding: the first seed's dream that ends in a death,
    then the first that ends in a win, each after least..steps steps (`tries` seeds; else seed 0's). -> {end: seed}"""
    def clip(seed):  # one dream's pictures, the last one held a second, and how it ended: "dies", "WIN" or ""
        torch.manual_seed(seed)
        frames, zs, pics = [], [], []

        def policy(z, h, idx):  # (1,Z), (1,H): C on M's z; D (if C reads it) on V's pictures, M's hop head on z
            frames.append(decode(agent.vae, z))  # (1,64,64,3)
            zs.append(z)
            d = danger_logit(agent.inputs, agent.danger, agent.mdn, z, zs[max(len(zs) - 2, 0)], frames[-1],
                             frames[max(len(frames) - 2, 0)])  # (1,) or None: as Agent.act, on V's pictures of z
            a = int(choose(agent.weights, features(z, h, agent.inputs, d)))
            pics.append(caption(upscale(np.concatenate([frame, frames[-1][0]], 1)),  # (64,128,3), x4
                                f"start | dream seed {seed} tau={tau} t={len(pics)} {ACTION_NAMES[a]}"))
            return torch.tensor([a])
        ret, length = mdn_dream(agent.mdn, policy, agent.vae.encode(to_input(frame[None]))[0], tau, max_steps=steps)
        end = "WIN" if ret.item() > 0 else "dies" if length.item() < steps else ""
        return end, pics + [caption(pics[-1][16:], f"dream seed {seed}: {end or 'going'}")] * 10  # [16:]: uncaptioned
    shown, gif = {}, []
    for seed in range(tries):
        end, pics = clip(seed)
        if end and end not in shown and len(pics) > least + 10:  # the first death and the first win (+10: the hold)
            shown[end], gif = seed, gif + pics
        if len(shown) == 2:
            break
    save_gif(path, gif or clip(0)[1], duration=100)
    return shown


def read_jsonl(path):
    """The rows of a .jsonl log, one dict per line."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def curves_png(run_dir, path):
    """Learning curves of V, M, D and C from their .jsonl logs; a missing log is skipped."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [("vae", "epoch", ["loss", "recon", "test_sq_err"], ["kl"], "V: summed squared error / KL"),
              ("mdnrnn", "epoch", ["nll", "test_nll"], ["win_bce", "death_bce", "hop_bce"], "M: z NLL / BCEs"),
              ("danger", "epoch", ["test_auc"], ["bce"], "D: held-out AUC / BCE"),
              ("controller", "generation", ["best", "mean", "val_mean"], [], "C: return (CMA-ES)")]
    panels = [(read_jsonl(os.path.join(run_dir, name + ".jsonl")), *rest) for name, *rest in panels
              if os.path.exists(os.path.join(run_dir, name + ".jsonl"))]
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, (rows, x, left, right, title) in zip(axes[0], panels):
        for axis, keys, style in ((ax, left, "-"), (ax.twinx() if right else None, right, "--")):
            for k in [k for k in keys if any(k in r for r in rows)]:
                axis.plot(*zip(*[(r[x], r[k]) for r in rows if k in r]), style, marker=".", label=k)
            if axis is not None:
                axis.legend(loc="upper right" if axis is ax else "center right", fontsize=8)
        ax.set_xlabel(x)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def pictures(agent, cfg, mode):
    """agent.gif, reconstructions.png, dream.gif and curves.png in the run dir; returns their paths."""
    path = lambda name: os.path.join(cfg.run, name)  # noqa: E731
    recorded = play(agent, max(cfg.gif_episodes, 1), cfg.seed, mode, record=True, desc="record")[2]  # first levels
    if cfg.gif_episodes > 0:
        agent_gif(agent, recorded, path("agent.gif"))
    import imageio.v2 as imageio
    frames = np.concatenate([ep["obs"] for ep in recorded])  # (N,64,64,3): 8 of them, spread over the play, x2
    imageio.imwrite(path("reconstructions.png"),
                    upscale(reconstruction_grid(agent.vae, frames[np.linspace(0, len(frames) - 1, 8).astype(int)]), 2))
    dream_gif(agent, recorded[0]["obs"][0], cfg.tau, path("dream.gif"))
    curves = curves_png(cfg.run, path("curves.png"))  # False when the run has no logs
    return [path(n) for n in ("agent.gif",) * (cfg.gif_episodes > 0) + ("reconstructions.png", "dream.gif")
            + ("curves.png",) * curves]


def main(cfg):
    agent = load_agent(cfg.run)
    mode = cfg.distribution_mode or agent.distribution_mode
    if mode not in ("easy", "hard"):
        fail(f"--distribution-mode {mode!r}: expected easy or hard")
    results = {name: summarize(*play(policy, cfg.episodes, cfg.seed, mode, desc=name)) for name, policy in
               (("agent", agent), ("random", RandomPolicy(cfg.seed)), ("always_up", Always(UP)))}
    print(f"{cfg.run}: {cfg.episodes} {mode} levels of seed {cfg.seed} per policy")
    print(f"{'policy':<10} {'episodes':>8} {'win rate':>8}  {'95% CI':<16} {'mean return':>11} {'mean length':>11}")
    for name, r in results.items():
        ci = "[{:.1%}, {:.1%}]".format(*r["ci95"])
        print(f"{name:<10} {r['episodes']:>8} {r['win_rate']:>8.1%}  {ci:<16} {r['mean_return']:>11.3f} "
              f"{r['mean_length']:>11.1f}")
    probe = None
    if cfg.death_steps:  # D's and the world model's answer on the same UPs of levels no training step saw
        d_path = os.path.join(cfg.run, "danger.pt")
        d = agent.danger if agent.danger is not None else load_danger(d_path) if os.path.exists(d_path) else None
        probe = death_probe(agent.vae, agent.mdn, d, mode, cfg.death_steps, seed=cfg.seed)
        print(f"does this UP kill? {probe['ups']} UPs of hop-then-wait play ({probe['deadly']:.1%} deadly), "
              f"AUC: D {'-' if d is None else format(probe['d_auc'], '.3f')}, V+M (M's hop head) "
              f"{'-' if probe['m_auc'] is None else format(probe['m_auc'], '.3f')}")
    if cfg.pictures:
        for path in pictures(agent, cfg, mode):
            print(f"wrote {path}")
    if cfg.json:
        baselines = {k: v for k, v in results.items() if k != "agent"}
        print(json.dumps(dict(**results["agent"], distribution_mode=mode, seed=cfg.seed, run=cfg.run, baselines=baselines,
                              death_probe=probe)))
    return results


if __name__ == "__main__":
    torch.set_num_threads(os.cpu_count() or 1)
    interruptible(main, cli(EvalConfig))
