"""The whole World Models pipeline in one command (Ha & Schmidhuber 2018, section 3's recipe):
collect random rollouts -> train V -> encode them and train M (and its hop head, on hop-then-wait
play) -> train D, a danger CNN, on the same kind of play (our addition) -> evolve C with CMA-ES, then
test the agent on held-out levels next to the random and always-UP baselines.

    python train.py                                   # default preset, easy mode, runs/easy-default
    python train.py --preset tiny --out /tmp/tiny     # the whole pipeline in a few minutes
    python train.py --preset no-d                     # no D: C reads M's hop head (larger, mirrored), V z 256
    python train.py --distribution-mode hard --preset paper
    python train.py --iterations 2                    # Ha's iterative training: C plays, V, M and C learn again

Everything goes into one run dir (later rounds of --iterations into its round2/, round3/, ...). A stage
whose output is complete is skipped, an unfinished one resumes, so running the same command again after
an interruption continues where it stopped.
"""
import argparse
import dataclasses
import json
import os
import resource
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np

import collect
import controller
import danger
import evaluate
import mdnrnn
import vae


@dataclass
class TrainConfig:
    out: str = ""  # run dir (default: runs/<distribution-mode>-<preset>)
    preset: Literal["tiny", "default", "no-d", "paper"] = "default"  # tiny (minutes), default (23-34 min), no-d (28-39), paper
    distribution_mode: Literal["easy", "hard"] = "easy"  # procgen difficulty (the seed report used hard)
    seed: int = 0  # one seed for every stage
    episodes: int = 2000  # random rollouts collected for V and M
    up_prob: float = 0.4  # collection policy: probability that a new random action is UP
    z_dim: int = 128  # V's latent size (spatial: a multiple of 64)
    spatial: bool = True  # V's z as an 8x8 grid (sees the frog and cars in minutes) or Ha's flat vector
    vae_epochs: int = 4  # passes of V over the frames
    fg_weight: float = 10.0  # V's extra weight on pixels that move (frog, cars, logs)
    colour_balance: bool = False  # V weighs each colour of a frame's foreground the same (hard mode's tiny frog)
    kl_tolerance: float = 0.5  # V's free bits: a KL below this many nats times z_dim is not penalised
    hidden: int = 256  # M's LSTM units
    gaussians: int = 5  # M's mixture components per latent dim
    mdn_epochs: int = 30  # passes of M over the sequences (its held-out NLL and death AUC still improve from 10 to 30)
    hop_steps: int = 400_000  # env steps of hop-then-wait play that M's hop head learns from (0: none)
    hop_width: int = 32  # channels of the hop head's 3x3 convs on V's grid (--preset no-d: 64, README)
    hop_convs: int = 2  # the hop head's 3x3 convs (--preset no-d: 3; each sees the cars one cell further)
    danger_steps: int = 400_000  # env steps of hop-then-wait play that D learns from (0: no D)
    danger_epochs: int = 20  # passes of D over the recorded UPs (mirrored at random)
    generations: int = 30  # CMA-ES generations
    popsize: int = 32  # CMA-ES candidates per generation
    levels: int = 16  # episodes per candidate per generation (common levels)
    max_steps: int = 250  # fitness episodes stop here (the held-out test plays the game's full 500)
    sigma0: float = 0.5  # CMA-ES initial step size
    danger_prior: float = 1.0  # CMA-ES starts at "UP iff D's logit < start_threshold, else no-op" (0: at zero)
    start_threshold: float = 0.0  # that rule's threshold (lower: fewer, safer UPs)
    inputs: Literal["z", "zh", "zhd", "zhm"] = "zhd"  # C reads z, [z, h] (Ha's), [z, h] + D's logit d or M's hop m
    mirror: bool = False  # with m: M's hop head reads the frame and its mirror image, the logits averaged (2x V's work)
    controller_env: Literal["real", "dream"] = "real"  # C's fitness: the game, or M's dream (then zh and no D)
    temperature: float = 1.15  # the dream's tau (Ha: 1.15 for Doom)
    dream_episodes: int = 256  # dream episodes per candidate per generation
    eval_every: int = 5  # generations between re-tests of the CMA mean and best
    eval_levels: int = 64  # levels of those re-tests
    workers: int = 0  # rollout processes (0 = one per core)
    pool: Literal["process", "ray"] = "process"  # where C's rollouts run: local processes or Ray (a cluster)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # where V, M and D train (auto: the GPU if torch sees one)
    eval_episodes: int = 1000  # held-out episodes of the final summary (0 = skip it)
    death_steps: int = 50_000  # hop-then-wait steps of the summary's "does this UP kill?" test of D and V+M (0: none)
    export: str = ""  # after training, copy the agent's weights (float16, no optimizer) to this new dir
    iterations: int = 1  # rounds of Ha's iterative training: each later one plays C, then retrains V, M and C on all data
    explore: float = 0.2  # in rounds after the first, the chance that each step of C's play is a random action

    def __post_init__(self):  # the stages' own checks would come only when each starts: check all here
        collect.check_flags(self, at_least=dict(
            episodes=1, z_dim=1, vae_epochs=1, hidden=1, gaussians=1, mdn_epochs=1, danger_steps=0, danger_epochs=1,
            generations=1, popsize=2, levels=1, max_steps=1, eval_every=1, eval_levels=1, workers=0, eval_episodes=0,
            death_steps=0, up_prob=0, dream_episodes=1, hop_steps=0, iterations=1, explore=0, hop_width=1, hop_convs=1),
            above=dict(sigma0=0, temperature=0))
        if self.explore > 1:
            collect.fail(f"--explore {self.explore}: a probability, expected 0 to 1")
        vae.pick_device(self.device)
        if self.spatial and self.z_dim % 64:
            collect.fail(f"--z-dim {self.z_dim}: a spatial V needs a multiple of 64, or --spatial false")
        if ("d" in self.inputs) != (self.danger_steps > 0):
            collect.fail(f"--inputs {self.inputs} with --danger-steps {self.danger_steps}: C reads D (d) exactly "
                         "when D is trained")
        if "m" in self.inputs and not self.hop_steps:
            collect.fail(f"--inputs {self.inputs} with --hop-steps 0: C reads M's hop head (m), which needs its play")
        if self.controller_env == "dream" and self.inputs[-1] in "dm":
            collect.fail(f"--controller-env dream with --inputs {self.inputs}: the dream gives C only z and h")
        if self.mirror and "m" not in self.inputs:
            collect.fail(f"--mirror with --inputs {self.inputs}: the mirror is read by M's hop head (m), --inputs zhm")


PRESETS = {
    "tiny": dict(episodes=64, z_dim=64, vae_epochs=1, hidden=32, gaussians=2, mdn_epochs=2, danger_steps=4096,
                 danger_epochs=1, hop_steps=4096, generations=2, popsize=4, levels=2, eval_every=1, eval_levels=4,
                 eval_episodes=64, death_steps=640),
    "default": {},
    "no-d": dict(inputs="zhm", danger_steps=0, z_dim=256, colour_balance=True, vae_epochs=7, hop_steps=1_600_000,
                 hop_convs=3, hop_width=64, mirror=True, start_threshold=-1.0, generations=5),  # README: "without D"
    "paper": dict(episodes=10000, z_dim=512, spatial=False, vae_epochs=10, hidden=1024, gaussians=16, mdn_epochs=45,
                  danger_steps=0, inputs="zh", generations=100, popsize=30, levels=30),
}


DREAM = dict(inputs="zh", danger_steps=0)  # --controller-env dream's defaults: C on [z, h], as D needs real frames
RUN_FLAGS = ("out", "generations", "workers", "pool", "device", "eval_episodes", "death_steps", "export",
             "iterations")  # free on a continued run: more rounds continue it


def parse_args(argv=None):
    """--preset (and --controller-env dream) pick the defaults; every other flag overrides one field of them."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default=TrainConfig.preset, choices=sorted(PRESETS))
    pre.add_argument("--controller-env", default=TrainConfig.controller_env, choices=("real", "dream"))
    known = pre.parse_known_args(argv)[0]
    defaults = {**PRESETS[known.preset], **(DREAM if known.controller_env == "dream" else {})}
    cfg = collect.cli(TrainConfig, argv, defaults=TrainConfig(preset=known.preset, **defaults))
    name = f"{cfg.distribution_mode}-{cfg.preset}" + ("-dream" if cfg.controller_env == "dream" else "")
    return dataclasses.replace(cfg, out=cfg.out or os.path.join("runs", name))


def export(run_dir, dest):
    """The checkpoints without optimizer or CMA state, weights in float16: a few MB that
    evaluate.py --run DEST plays as it is (the loaders cast back to float32)."""
    os.makedirs(dest)  # never into an existing dir (run() refuses one before training)
    for name, drop in (("vae.pt", ("optimizer",)), ("mdnrnn.pt", ("optimizer",)), ("danger.pt", ("optimizer",)),
                       ("controller.pt", ("cma_x", "cma_fitness"))):
        if not os.path.exists(os.path.join(run_dir, name)):
            continue  # a run without D
        ckpt = {k: v for k, v in vae.load_checkpoint(os.path.join(run_dir, name)).items() if k not in drop}
        if "model" in ckpt:
            ckpt["model"] = {k: v.half() if v.is_floating_point() else v for k, v in ckpt["model"].items()}
        vae.save_atomic(ckpt, os.path.join(dest, name))
    print(f"exported the agent of {run_dir} to {dest}")


class Explore:
    """C's play for a later round's data: C's action, or with probability p a uniformly random one. Trap: M's
    memory inside the agent keeps C's choice, not the random action taken (a small error, of this play only)."""

    def __init__(self, agent, p, seed):
        self.agent, self.p, self.rng = agent, p, np.random.default_rng(seed)

    def reset(self, num_envs):
        self.agent.reset(num_envs)

    def act(self, obs, first, alive=None):
        a = self.agent.act(obs, first, alive)  # (N,) procgen ids: C sees every frame, so its memory goes on
        random = collect.ACTIONS[self.rng.integers(0, len(collect.ACTIONS), len(a))]  # (N,)
        return np.where(self.rng.random(len(a)) < self.p, random, a)


def play_round(cfg, prev, here, k, chunk=250):
    """Round k's data (Ha's iterative training, section 5): the last round's episodes (hard links, not copies),
    then cfg.episodes new ones, the last round's agent playing with --explore on levels of their own (seeds
    from 2,000,000: no training or test stream uses them), written in collect.py's format. Resumable by chunks
    of 250 episodes. -> env steps of this play (also when an earlier, interrupted run played it)."""
    data, made = os.path.join(here, "data"), os.path.join(here, "data", "collect_config.json")
    if os.path.exists(made):
        print(f"round {k}: {data} is complete, nothing to do")
        with open(made) as f:
            return json.load(f)["env_steps"]
    os.makedirs(data, exist_ok=True)
    old = collect.list_episodes(os.path.join(prev, "data"))
    for i, src in enumerate(old):
        if not os.path.exists(dst := collect.episode_path(data, i)):
            os.link(src, dst)  # the same file twice on disk costs nothing; a round never rewrites one
    agent, index = evaluate.load_agent(prev), {int(a): i for i, a in enumerate(collect.ACTIONS)}
    steps = 0
    for c in range(0, cfg.episodes, chunk):
        n = min(chunk, cfg.episodes - c)
        if all(os.path.exists(collect.episode_path(data, len(old) + c + j)) for j in range(n)):
            continue  # written before an interruption (its steps go uncounted, as a skipped collection's)
        seed = 2_000_000 + 100_000 * cfg.seed + 1_000 * k + c // chunk
        returns, lengths, eps = evaluate.play(Explore(agent, cfg.explore, seed), n, seed, cfg.distribution_mode,
                                              record=True, desc=f"round {k} play")
        for j, (ret, ep) in enumerate(zip(returns, eps)):
            if os.path.exists(collect.episode_path(data, len(old) + c + j)):
                continue  # kept from an interrupted run: the same seeded play made it
            T = len(ep["action"])
            reward = np.zeros(T, np.float32)
            reward[-1] = ret  # leaper pays only at the end
            collect.savez(collect.episode_path(data, len(old) + c + j), True, obs=ep["obs"], reward=reward,
                          action=np.array([index[int(a)] for a in ep["action"]], np.int8), done=np.arange(T) == T - 1)
        steps += int(lengths.sum())
        print(f"round {k}: {c + n}/{cfg.episodes} episodes of C's play, win fraction {(returns > 0).mean():.3f}")
    with open(made, "w") as f:  # last: it marks the data complete (and V's data identity)
        json.dump(dict(round=k, agent=vae.load_checkpoint(os.path.join(prev, "controller.pt")).get("id", ""),
                       explore=cfg.explore, episodes=cfg.episodes, seed=cfg.seed, env_steps=steps), f)
    return steps


def round_stages(cfg, here, k):
    """V, M (in the first round also D) and C of round k, all in the dir `here`. -> env steps of M's hop play, D's
    play and C's rollouts. Later rounds fine-tune the last round's V on all the data, retrain M from scratch
    (minutes; its latents change with V anyway) and evolve C again from its start point; D stays the first's."""
    def path(name):
        return os.path.join(here, name)
    prev = cfg.out if k <= 2 else os.path.join(cfg.out, f"round{k - 1}")  # the last round's dir
    tag = "" if k == 1 else f" (round {k} of {cfg.iterations})"
    print(f"== 2/5 train V{tag}")
    vae.train(vae.VAEConfig(data=path("data"), out=path("vae.pt"), z_dim=cfg.z_dim, spatial=cfg.spatial,
                            epochs=cfg.vae_epochs, fg_weight=cfg.fg_weight, colour_balance=cfg.colour_balance,
                            kl_tolerance=cfg.kl_tolerance, seed=cfg.seed, resume=True,
                            init=os.path.join(prev, "vae.pt") if k > 1 else "",
                            device=cfg.device))
    print(f"== 3/5 encode, play hop-then-wait for M's hop head, and train M{tag}")
    mdnrnn.train(mdnrnn.MDNConfig(data=path("data"), vae=path("vae.pt"), out=path("mdnrnn.pt"), hidden=cfg.hidden,
                                  gaussians=cfg.gaussians, epochs=cfg.mdn_epochs, hop_steps=cfg.hop_steps,
                                  hop_width=cfg.hop_width, hop_convs=cfg.hop_convs,
                                  distribution_mode=cfg.distribution_mode, seed=cfg.seed, resume=True,
                                  device=cfg.device))
    print("== 4/5 no D (--danger-steps 0)" if not cfg.danger_steps else "== 4/5 train D on hop-then-wait play"
          if k == 1 else f"== 4/5 D: the first round's{tag}")
    if cfg.danger_steps and k == 1:
        danger.train(danger.DangerConfig(out=path("danger.pt"), distribution_mode=cfg.distribution_mode,
                                         steps=cfg.danger_steps, epochs=cfg.danger_epochs, seed=cfg.seed, resume=True,
                                         device=cfg.device))
    elif cfg.danger_steps and not os.path.exists(path("danger.pt")):
        os.link(os.path.join(cfg.out, "danger.pt"), path("danger.pt"))  # the round's dir holds a whole agent
    d_steps = vae.load_checkpoint(path("danger.pt"))["env_steps"] if cfg.danger_steps and k == 1 else 0
    print(f"== 5/5 evolve C{tag}")
    shared = ("distribution_mode", "generations", "popsize", "levels", "max_steps", "sigma0", "danger_prior", "inputs",
              "start_threshold", "controller_env", "temperature", "dream_episodes", "eval_every", "eval_levels",
              "workers", "pool", "seed", "mirror")
    ccfg = controller.CConfig(vae=path("vae.pt"), mdnrnn=path("mdnrnn.pt"), out=path("controller.pt"),
                              danger=path("danger.pt"), resume=True, **{f: getattr(cfg, f) for f in shared})
    controller.train(ccfg)
    return danger.hop_env_steps(cfg.hop_steps), int(d_steps), int(vae.load_checkpoint(path("controller.pt"))["env_steps"])


def run(cfg):
    if cfg.export and os.path.exists(cfg.export):
        collect.fail(f"--export {cfg.export} exists; choose a new directory")
    t0 = time.time()
    os.makedirs(cfg.out, exist_ok=True)

    def path(name):
        return os.path.join(cfg.out, name)
    if os.path.exists(path("train_config.json")):  # its stages were made with these flags: no silent mixing
        with open(path("train_config.json")) as f:
            collect.check_same_flags(dataclasses.asdict(cfg), json.load(f), path("train_config.json"), free=RUN_FLAGS)
    with open(path("train_config.json"), "w") as f:
        json.dump(dataclasses.asdict(cfg), f, indent=1)
    print(f"run dir {cfg.out}, preset {cfg.preset}, {cfg.distribution_mode} mode, V, M and D on "
          f"{vae.pick_device(cfg.device)}, C's rollouts on {cfg.pool}")

    print("== 1/5 collect random rollouts")
    c = collect.collect(collect.CollectConfig(out=path("data"), episodes=cfg.episodes, seed=cfg.seed,
                                              distribution_mode=cfg.distribution_mode, up_prob=cfg.up_prob))
    if c["env_steps"]:  # a skipped collection reports 0 steps: keep the numbers of the one that ran
        with open(path("collect.json"), "w") as f:
            json.dump(c, f)
    elif os.path.exists(path("collect.json")):
        with open(path("collect.json")) as f:
            c = json.load(f)
    rounds = [cfg.out] + [path(f"round{k}") for k in range(2, cfg.iterations + 1)]  # each a whole agent's dir
    m_steps, d_steps, c_steps, p_steps = *round_stages(cfg, cfg.out, 1), 0
    for k, here in enumerate(rounds[1:], 2):
        print(f"== round {k} of {cfg.iterations}: the agent of round {k - 1} plays; V, M and C learn on all the data")
        p_steps += play_round(cfg, rounds[k - 2], here, k)
        m, _, cs = round_stages(cfg, here, k)
        m_steps, c_steps = m_steps + m, c_steps + cs
    peak = max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    summary = dict(run=rounds[-1], minutes=(time.time() - t0) / 60, peak_rss_gb=peak / 2**20,  # ru_maxrss is in KB
                   collect_env_steps=c["env_steps"], hop_env_steps=m_steps, danger_env_steps=d_steps,
                   controller_env_steps=c_steps, agent_play_env_steps=p_steps,
                   env_steps=int(c["env_steps"] + m_steps + d_steps + c_steps + p_steps))
    print(f"trained in {summary['minutes']:.1f} min, peak memory (RSS) {summary['peak_rss_gb']:.2f} GB; "
          f"real env steps: collection {c['env_steps']:,} + M's hop play {m_steps:,} + D's play "
          f"{d_steps:,} + C's real rollouts {c_steps:,}" + (f" + the agents' play {p_steps:,}" if p_steps else "")
          + f" = {summary['env_steps']:,}")
    if cfg.eval_episodes:  # summary.json holds the last run that was tested; an untested resume keeps it
        print(f"== held-out test of {rounds[-1]}: {cfg.eval_episodes} episodes on levels training never used")
        summary["test"] = evaluate.main(evaluate.EvalConfig(run=rounds[-1], episodes=cfg.eval_episodes,
                                                            death_steps=cfg.death_steps))
        with open(path("summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
    if cfg.export:
        export(rounds[-1], cfg.export)
    return summary


if __name__ == "__main__":
    collect.interruptible(run, parse_args())
