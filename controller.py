"""C: the controller of World Models (Ha & Schmidhuber 2018, section 2.3), one linear layer + sigmoid
on [z_t, h_t] -> 5 action scores, trained by CMA-ES (the `cma` package) on the real game. With
--inputs zhd (the default) it also reads D's logit of "this UP is deadly" (danger.py), and CMA-ES
starts at the controller D implies: UP iff that logit < 0, else no-op.

Fitness rollouts are batched: one procgen env per level holds a copy of the level per candidate (all
candidates play the same levels), V, D and M run once per step on all the envs still playing, and
each candidate applies its own weights to its envs. The levels are split over a process pool.

    python controller.py                          # runs/vae.pt, mdnrnn.pt, danger.pt -> runs/controller.pt
    python controller.py --inputs zh --out runs/controller_zh.pt     # Ha's C on [z, h], without D
"""
import dataclasses
import json
import multiprocessing as mp
import os
import signal
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Literal

import cma
import numpy as np
import torch
from tqdm import tqdm

from collect import ACTIONS, MAX_STEPS, NONE, UP, check_flags, cli, fail, interruptible, make_env
from danger import load_danger
from mdnrnn import load_mdnrnn
from vae import identity, load_checkpoint, load_vae, resume_point, save_atomic, to_input


@dataclass
class CConfig:
    vae: str = "runs/vae.pt"  # trained V
    mdnrnn: str = "runs/mdnrnn.pt"  # trained M
    danger: str = "runs/danger.pt"  # trained D (danger.py), read only when --inputs has d
    out: str = "runs/controller.pt"  # checkpoint (best parameters + CMA-ES history); a .jsonl log beside it
    distribution_mode: Literal["easy", "hard"] = "easy"  # procgen difficulty the controller is trained on
    inputs: Literal["z", "zh", "zhd"] = "zhd"  # what C reads: z, [z, h] (Ha's C), or [z, h] and D's logit d
    generations: int = 30  # CMA-ES generations (ask -> evaluate -> tell)
    popsize: int = 32  # candidates per generation
    levels: int = 16  # episodes per candidate per generation: the same new levels for all candidates
    max_steps: int = 250  # fitness episodes stop here (easy wins take 25-100 steps; the game's cap is 500)
    sigma0: float = 0.5  # initial CMA-ES step size
    up_bias: float = 0.0  # start the search at "always UP" (UP's bias = up_bias) instead of at zero
    danger_prior: float = 1.0  # with d: start at "UP iff D's logit < 0, else no-op" (0: start at zero)
    diagonal: int = 1000  # above this many parameters use the diagonal (sep-)CMA, O(n) per step
    eval_every: int = 5  # every this many generations, re-test the CMA mean and the generation's best
    eval_levels: int = 64  # ... on this many fixed validation levels; the better one is kept as "best"
    workers: int = 0  # processes for the fitness rollouts (0 = one per CPU core)
    seed: int = 0  # seeds CMA-ES and the level draws
    resume: bool = False  # continue the same search from --out

    def __post_init__(self):
        check_flags(self, at_least=dict(generations=1, popsize=2, levels=1, max_steps=1, eval_every=1, eval_levels=1,
                                        workers=0), above=dict(sigma0=0))


def input_sizes(inputs, z_dim, hidden):
    """{input group: its size} in C's input order, e.g. {"z": 128, "h": 256, "d": 1}."""
    return {k: dict(z=z_dim, h=hidden, d=1)[k] for k in inputs}


def features(z, h, inputs, danger=None):
    """C's input: z (n,Z), M's hidden state h (n,H), D's logit (n,) -> (n,n_features)."""
    parts = dict(z=z, h=h, d=None if danger is None else danger[:, None])
    return torch.cat([parts[k] for k in inputs], -1)  # (n,n_features)


def choose(weights, f):
    """C itself: weights (n,5,n_features+1) (each env its own controller; bias last) or
    (5,n_features+1) (one for all), inputs f (n,n_features) -> action indices (n,)."""
    weights = weights.expand(len(f), -1, -1)  # (n,5,n_features+1)
    scores = torch.sigmoid(torch.einsum("naf,nf->na", weights[..., :-1], f) + weights[..., -1])  # (n,5)
    return scores.argmax(-1)  # sigmoid is monotonic: the action is the argmax of the linear scores, as in the seed


class Agent:
    """V -> C -> M as one policy over a batch of procgen envs: the fitness rollouts and evaluate.py
    both play it. weights: (5,n_features+1), one C for every env, or (n,5,n_features+1), one per env."""

    def __init__(self, vae, mdn, weights, inputs, danger=None, distribution_mode="easy"):
        self.vae, self.mdn, self.weights, self.inputs = vae, mdn, weights.float(), inputs
        self.danger, self.distribution_mode, self.state, self.last = danger, distribution_mode, None, None

    def reset(self, num_envs):
        H = self.mdn.hidden
        self.state = (torch.zeros(1, num_envs, H), torch.zeros(1, num_envs, H))  # M's memory (h, c), each (1,N,H)
        self.last = None  # the previous frame, for D

    @torch.no_grad()
    def act(self, obs, first, alive=None):
        """obs uint8 (N,64,64,3), first bool (N,): a new episode starts (its memory is zeroed),
        alive bool (N,): only these envs are computed, the others get NONE. -> procgen ids (N,)."""
        n, first = len(obs), np.asarray(first, dtype=bool)
        if self.state is None or self.state[0].shape[1] != n:
            self.reset(n)
        h, c = self.state
        h[:, first], c[:, first] = 0.0, 0.0
        # D's last frame: on an episode's first step, the first frame itself.
        last = np.where(first[:, None, None, None], obs, obs if self.last is None else self.last)  # (N,64,64,3)
        self.last = obs
        idx = np.arange(n) if alive is None else np.flatnonzero(alive)
        actions = np.full(n, ACTIONS[NONE])
        if len(idx) == 0:
            return actions
        z = self.vae.encode(to_input(obs[idx]))[0]  # V: (n,Z), mu, no sampling at control time (as Ha)
        d = self.danger(obs[idx], last[idx]).clamp(-10, 10) if "d" in self.inputs else None  # (n,) or None
        weights = self.weights if self.weights.dim() == 2 else self.weights[idx]
        a = choose(weights, features(z, h[0, idx], self.inputs, d))  # C: (n,) action indices
        h[:, idx], c[:, idx] = self.mdn.advance(z, a, (h[:, idx], c[:, idx]))  # M remembers what was done
        actions[idx] = ACTIONS[a.numpy()]
        return actions


def rollout(vae, mdn, params, level_seeds, distribution_mode, inputs, max_steps=MAX_STEPS, danger=None):
    """Play every candidate of params (P, n_params) once on each level. Returns (P, E) returns and
    the number of agent steps. Each env counts only its first episode; finished envs cost no
    encoder or LSTM work (procgen still steps them, with the no-op, which is cheap)."""
    P, E = len(params), len(level_seeds)
    envs = [make_env(P, distribution_mode, start_level=int(s), num_levels=1) for s in level_seeds]
    weights = torch.as_tensor(params, dtype=torch.float32).view(P, len(ACTIONS), -1).repeat(E, 1, 1)  # (E*P,5,F+1)
    agent = Agent(vae, mdn, weights, inputs, danger)
    obs = np.concatenate([e.observe()[1]["rgb"] for e in envs])  # (E*P,64,64,3): env k*P+p = candidate p, level k
    first, alive, ret, steps = np.ones(E * P, dtype=bool), np.ones(E * P, dtype=bool), np.zeros(E * P), 0
    for _ in range(max_steps):
        actions = agent.act(obs, first, alive)  # (E*P,) procgen ids
        for k, env in enumerate(envs):
            env.act(actions[k * P:(k + 1) * P])
        out = [e.observe() for e in envs]  # (reward, obs, first) per level
        rew, obs = np.concatenate([o[0] for o in out]), np.concatenate([o[1]["rgb"] for o in out])
        first = np.concatenate([o[2] for o in out])
        ret[alive] += rew[alive]
        steps += int(alive.sum())
        # CRUCIAL: procgen auto-resets; after `first` an env is playing a new level: stop counting it.
        alive &= ~first
        if not alive.any():
            break
    return ret.reshape(E, P).T, steps  # (P,E)


_models = {}  # each pool worker loads V, M and D once


def init_worker(vae_path, mdn_path, danger_path=""):
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    torch.set_num_threads(1)  # one thread per process: the processes are the parallelism
    _models["vae"], _models["mdn"] = load_vae(vae_path), load_mdnrnn(mdn_path)
    _models["danger"] = load_danger(danger_path) if danger_path else None


def rollout_job(job):
    return rollout(_models["vae"], _models["mdn"], *job, danger=_models["danger"])


def make_pool(workers, vae_path, mdn_path, danger_path=""):
    """A process pool whose workers hold the models. ProcessPoolExecutor, not multiprocessing.Pool:
    when a worker dies (SIGKILL, out of memory, a segfault in the env) it raises BrokenProcessPool
    at once, where Pool.map waits forever for the lost job."""
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    return ProcessPoolExecutor(workers, ctx, initializer=init_worker, initargs=(vae_path, mdn_path, danger_path))


def fitness(pool, params, level_seeds, distribution_mode, inputs, workers, max_steps=MAX_STEPS):
    """Mean return of each candidate over the levels split over the workers; serial (pool=None): the same."""
    chunks = [c for c in np.array_split(np.asarray(level_seeds), workers) if len(c)]
    jobs = [(params, c, distribution_mode, inputs, max_steps) for c in chunks]
    results = list(pool.map(rollout_job, jobs) if pool else map(rollout_job, jobs))
    returns = np.concatenate([r for r, _ in results], axis=1)  # (P,E)
    return returns.mean(axis=1), sum(s for _, s in results)


def cma_generation(es, evaluate):
    """One generation of CMA-ES: ask -> evaluate -> tell. evaluate(X (P,n)) -> (fitness (P,), info)."""
    X = np.array(es.ask())  # ask: popsize candidate parameter vectors
    fit, info = evaluate(X)  # evaluate: higher is better
    es.tell(list(X), (-fit).tolist())  # tell: cma minimises, so it gets minus the fitness
    return X, fit, info


def resume(es, ckpt, path):
    """Rebuild CMA-ES's state by asking and telling each stored generation again: exact (the same seed asks
    for the same candidates, checked), and nothing is unpickled. -> (gen, best, score, env steps, history)."""
    if "cma_x" not in ckpt:
        fail(f"{path}: from an older version (a pickled CMA-ES state, never loaded); use another --out")
    history_x, history_fit = list(ckpt["cma_x"].numpy()), list(ckpt["cma_fitness"].numpy())  # (P,n), (P,) each
    for g, (X, fit) in enumerate(zip(history_x, history_fit)):
        if not np.array_equal(np.array(es.ask()), X):
            fail(f"{path}: generation {g + 1} of its CMA-ES history does not replay (another cma version?)")
        es.tell(list(X), (-fit).tolist())
    print(f"C: resumed {path} at generation {ckpt['generation']}")
    return (ckpt["generation"], ckpt["params"].double().numpy(), ckpt["best_score"], ckpt["env_steps"],
            history_x, history_fit)


def start_point(n_params, inputs, up_bias=0.0, danger_prior=0.0):
    """CMA-ES's first mean, (5, n_features+1), bias last: zero plus priors the search can leave. up_bias: always
    UP. danger_prior: D's rule "UP iff D's logit < 0, else no-op" (in hard mode CMA-ES from zero missed it)."""
    x0 = np.zeros((len(ACTIONS), n_params // len(ACTIONS)))  # (5,n_features+1)
    x0[UP, -1] = up_bias
    if "d" in inputs:
        x0[UP, -2] = -danger_prior  # d is the last input, just before the bias
        x0[[a for a in range(len(ACTIONS)) if a not in (UP, NONE)], -1] -= danger_prior  # else NONE wins
    return x0


def make_search(cfg, sizes):
    """The CMA-ES object at its start. Fan-in scaled steps, as in weight init: each input group (z: 128
    numbers, h: 256, d: 1) starts with the same say in C's scores, so one d is not drowned by 384 others."""
    n_params = len(ACTIONS) * (sum(sizes.values()) + 1)
    stds = np.concatenate([np.full(n, n ** -0.5) for n in sizes.values()] + [np.ones(1)])  # (n_features+1,)
    opts = dict(popsize=cfg.popsize, seed=cfg.seed + 1, CMA_diagonal=n_params > cfg.diagonal, verbose=-9,
                CMA_stds=np.tile(stds, len(ACTIONS)))  # (5*(n_features+1),), the order of x0.ravel()
    x0 = start_point(n_params, cfg.inputs, cfg.up_bias, cfg.danger_prior)
    return cma.CMAEvolutionStrategy(x0.ravel(), cfg.sigma0, opts)


def level_draw(seed, generation, n):
    """Training levels of one generation: fresh each generation, the same on resume."""
    return np.random.default_rng([seed, generation]).integers(0, 2**31 - 1, n)


def train(cfg):
    danger = cfg.danger if "d" in cfg.inputs else ""
    made_from = {name: load_checkpoint(path).get("id", "") for name, path in  # what C is trained on; a missing
                 (("vae", cfg.vae), ("mdnrnn", cfg.mdnrnn), ("danger", danger)) if path}  # file: one error line
    ckpt = resume_point(cfg, "generations", made_from)
    if ckpt and ckpt["generation"] >= cfg.generations:
        print(f"C: {cfg.out} already has {cfg.generations} generations, skipping")
        return ckpt["params"].numpy()
    os.makedirs(os.path.dirname(os.path.abspath(cfg.out)), exist_ok=True)
    vae, mdn = load_vae(cfg.vae), load_mdnrnn(cfg.mdnrnn)
    # Seeding, in one place: CMA-ES's sampling (its seed) and the levels (level_draw, val_levels).
    es = make_search(cfg, input_sizes(cfg.inputs, vae.z_dim, mdn.hidden))
    n_params, workers = es.N, cfg.workers or os.cpu_count() or 1
    val_levels = np.random.default_rng([cfg.seed, 10**9]).integers(0, 2**31 - 1, cfg.eval_levels)
    # Until the first validation the checkpoint holds the start point (D's rule): a playable agent, not zeros.
    gen, best, best_score, env_steps, history_x, history_fit = 0, es.mean.copy(), -1.0, 0, [], []
    if ckpt:
        gen, best, best_score, env_steps, history_x, history_fit = resume(es, ckpt, cfg.out)
    print(f"C: {n_params} parameters ({'diagonal' if es.opts['CMA_diagonal'] else 'full'} CMA-ES), "
          f"population {cfg.popsize} x {cfg.levels} levels, {workers} workers")
    task = (cfg.distribution_mode, cfg.inputs, workers, cfg.max_steps)
    pool = make_pool(workers, cfg.vae, cfg.mdnrnn, danger) if workers > 1 else None
    if pool is None:
        init_worker(cfg.vae, cfg.mdnrnn, danger)

    def evaluate(X, levels):  # fitness() on the pool; a pool whose worker died is replaced once, the job replayed
        nonlocal pool
        for attempt in range(2):
            try:
                return fitness(pool, X, levels, *task)
            except BrokenProcessPool:
                pool.shutdown(wait=False, cancel_futures=True)
                if attempt:
                    fail(f"fitness workers died twice in generation {gen + 1} (killed? out of memory?); "
                         f"{cfg.out} holds generation {gen}: run the same command with --resume to go on")
                print(f"C: a fitness worker died in generation {gen + 1}; replaying it on fresh workers")
                pool = make_pool(workers, cfg.vae, cfg.mdnrnn, danger)

    try:
        for gen in tqdm(range(gen, cfg.generations), desc="C (CMA-ES)", unit="gen", initial=gen,
                        total=cfg.generations, disable=None):  # disable=None: a bar on a terminal only
            t0 = time.time()
            levels = level_draw(cfg.seed, gen, cfg.levels)
            X, fit, steps = cma_generation(es, lambda X: evaluate(X, levels))
            history_x.append(X)
            history_fit.append(fit)
            env_steps += steps
            row = dict(generation=gen + 1, best=fit.max(), mean=fit.mean(), sigma=es.sigma, seconds=time.time() - t0,
                       agent_steps_per_s=steps / (time.time() - t0), env_steps=env_steps)
            if (gen + 1) % cfg.eval_every == 0 or gen + 1 == cfg.generations:
                # A generation's best is partly luck on 16 levels: re-test it and the mean on more.
                candidates = np.stack([es.mean, X[int(fit.argmax())]])
                val, s = evaluate(candidates, val_levels)
                env_steps += s
                row.update(val_mean=val[0], val_gen_best=val[1], env_steps=env_steps)
                if val.max() > best_score:
                    best, best_score = candidates[int(val.argmax())], val.max()
                row["val_best_so_far"] = best_score
            tqdm.write("C " + " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
            config = dataclasses.asdict(cfg)
            save_atomic(dict(params=torch.as_tensor(best, dtype=torch.float32), best_score=float(best_score),
                             config=config, z_dim=vae.z_dim, hidden=mdn.hidden, generation=gen + 1,
                             env_steps=env_steps, cma_x=torch.as_tensor(np.stack(history_x)),
                             cma_fitness=torch.as_tensor(np.stack(history_fit)), made_from=made_from,
                             id=identity(config, generation=gen + 1, **made_from)), cfg.out)
            with open(os.path.splitext(cfg.out)[0] + ".jsonl", "a") as f:
                f.write(json.dumps({k: float(v) for k, v in row.items()}) + "\n")
    finally:
        if pool:
            pool.shutdown(wait=False, cancel_futures=True)
    return best


if __name__ == "__main__":
    interruptible(train, cli(CConfig))
