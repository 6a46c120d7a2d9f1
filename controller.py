"""C: the controller of World Models (Ha & Schmidhuber 2018, section 2.3), one linear layer + sigmoid on [z_t, h_t] -> 5
action scores, trained by CMA-ES (`cma`) in the real game or in M's dream (section 4), rollouts batched over processes.
--inputs zhd (the default) adds D's logit of "this UP is deadly" (danger.py), zhm M's (its hop head on V's z; --mirror:
averaged with its reading of the mirrored frame), and C starts at the rule it implies: "UP iff it < --start-threshold".

    python controller.py                          # runs/vae.pt, mdnrnn.pt, danger.pt -> runs/controller.pt
    python controller.py --inputs zh --out runs/controller_zh.pt     # Ha's C on [z, h], without D
    python controller.py --inputs zh --controller-env dream --out runs/controller_dream.pt   # C learns in M's dream
"""
import dataclasses
import io
import json
import multiprocessing as mp
import os
import signal
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Literal

import cma
import numpy as np
import torch
from tqdm import tqdm

from collect import ACTIONS, MAX_STEPS, NONE, check_flags, cli, fail, interruptible, make_env
from danger import danger_logit, load_danger, start_point
from mdnrnn import dream, load_mdnrnn
from vae import identity, load_checkpoint, load_vae, resume_point, save_atomic, to_input

_models = {}  # each pool worker loads V, M and D once (init_worker)


@dataclasses.dataclass
class CConfig:
    vae: str = "runs/vae.pt"  # trained V
    mdnrnn: str = "runs/mdnrnn.pt"  # trained M
    danger: str = "runs/danger.pt"  # trained D (danger.py), read only when --inputs has d
    out: str = "runs/controller.pt"  # checkpoint (best parameters + CMA-ES history); a .jsonl log beside it
    distribution_mode: Literal["easy", "hard"] = "easy"  # procgen difficulty the controller is trained on
    inputs: Literal["z", "zh", "zhd", "zhm"] = "zhd"  # C reads z, [z, h] (Ha's) or [z, h] + D's (d) or M's (m) logit
    generations: int = 30  # CMA-ES generations (ask -> evaluate -> tell)
    popsize: int = 32  # candidates per generation
    levels: int = 16  # episodes per candidate per generation: the same new levels for all candidates
    max_steps: int = 250  # fitness episodes stop here (easy wins take 25-100 steps; the game's cap is 500)
    sigma0: float = 0.5  # initial CMA-ES step size
    danger_prior: float = 1.0  # with d or m: start at "UP iff its logit < start_threshold, else no-op" (0: at zero)
    start_threshold: float = 0.0  # that rule's threshold (lower: fewer, safer UPs)
    mirror: bool = False  # with m: M's logit averaged over the frame and its mirror image (a second V pass per step)
    diagonal: int = 1000  # above this many parameters use the diagonal (sep-)CMA, O(n) per step
    controller_env: Literal["real", "dream"] = "real"  # where candidates are scored: the game or M's dream (Ha §4)
    temperature: float = 1.15  # the dream's tau: M samples at this temperature (Ha: 1.15 for Doom)
    dream_episodes: int = 256  # dream episodes per candidate per generation, from new levels' first frames
    eval_every: int = 5  # every this many generations, re-test the CMA mean and the generation's best
    eval_levels: int = 64  # ... on this many fixed validation levels; the better one is kept as "best"
    workers: int = 0  # processes for the fitness rollouts (0 = one per CPU core)
    pool: Literal["process", "ray"] = "process"  # local processes, or Ray's (a cluster when RAY_ADDRESS is set)
    seed: int = 0  # seeds CMA-ES and the level draws
    resume: bool = False  # continue the same search from --out

    def __post_init__(self):
        check_flags(self, at_least=dict(generations=1, popsize=2, levels=1, max_steps=1, eval_every=1, eval_levels=1,
                                        workers=0, dream_episodes=1), above=dict(sigma0=0, temperature=0))
        if self.controller_env == "dream" and self.inputs[-1] in "dm":
            fail(f"--controller-env dream with --inputs {self.inputs}: the dream gives C only z and h (z, zh)")
        if self.mirror and "m" not in self.inputs:
            fail(f"--mirror with --inputs {self.inputs}: the mirror is read by M's hop head (m), --inputs zhm")


def input_sizes(inputs, z_dim, hidden):
    return {k: dict(z=z_dim, h=hidden, d=1, m=1)[k] for k in inputs}  # in C's order, e.g. {"z": 128, "h": 256, "d": 1}


def features(z, h, inputs, danger=None):
    """C's input: z (n,Z), M's hidden state h (n,H), the danger logit (n,) (D's or M's) -> (n,n_features)."""
    col = None if danger is None else danger.clamp(-10, 10)[:, None]  # (n,1), bounded: one input, not a lever
    return torch.cat([dict(z=z, h=h, d=col, m=col)[k] for k in inputs], -1)  # (n,n_features)


def choose(weights, f):
    """C itself: weights (n,5,F+1) (one C per env; bias last) or (5,F+1), inputs f (n,F) -> action indices (n,)."""
    weights = weights.expand(len(f), -1, -1)  # (n,5,n_features+1)
    scores = torch.sigmoid(torch.einsum("naf,nf->na", weights[..., :-1], f) + weights[..., -1])  # (n,5)
    return scores.argmax(-1)  # sigmoid is monotonic: the action is the argmax of the linear scores, as in the seed


class Agent:
    """V -> C -> M, one policy for a batch of envs (fitness rollouts, evaluate.py); weights (5,F+1), or (n,5,F+1)."""

    def __init__(self, vae, mdn, weights, inputs, danger=None, distribution_mode="easy", mirror=False):
        self.vae, self.mdn, self.weights, self.inputs, self.mirror = vae, mdn, weights.float(), inputs, mirror
        self.danger, self.distribution_mode, self.state, self.last = danger, distribution_mode, None, None

    def reset(self, num_envs):  # M's memory (h, c), each (1,N,H), the previous frame (for D), its z's (M's hop head)
        self.state, self.last = torch.zeros(2, 1, num_envs, self.mdn.hidden).unbind(), None
        self.z_last = torch.zeros(1 + self.mirror, num_envs, self.vae.z_dim)  # (1 or 2,N,Z): as seen (and mirrored)

    @torch.no_grad()
    def act(self, obs, first, alive=None):
        """obs uint8 (N,64,64,3); first (N,): new episode, memory zeroed; alive (N,): the rest get NONE -> ids (N,)"""
        n, first = len(obs), np.asarray(first, dtype=bool)
        if self.state is None or self.state[0].shape[1] != n:
            self.reset(n)
        h, c = self.state
        h[:, first], c[:, first] = 0.0, 0.0
        last, self.last = np.where(first[:, None, None, None], obs, obs if self.last is None else self.last), obs  # D's
        idx = np.arange(n) if alive is None else np.flatnonzero(alive)
        actions = np.full(n, ACTIONS[NONE])
        if len(idx) == 0:
            return actions
        x = to_input(obs[idx])  # (n,3,64,64); --mirror: V also sees it mirrored (2n,...), the game being symmetric
        z = self.vae.encode(torch.cat([x, x.flip(-1)]) if self.mirror else x)[0].view(-1, len(idx), self.vae.z_dim)
        z_last = torch.where(torch.from_numpy(first[idx])[:, None], z, self.z_last[:, idx])  # (1 or 2,n,Z)
        self.z_last[:, idx], self.zm, z = z, (z[1], z_last[1]) if self.mirror else None, z[0]  # (1 or 2,n,Z) -> (n,Z)
        a = self.decide(z, z_last[0], h[0, idx], obs[idx], last[idx], idx)  # C: (n,) action indices
        h[:, idx], c[:, idx] = self.mdn.advance(z, a, (h[:, idx], c[:, idx]))  # M remembers what was done
        actions[idx] = ACTIONS[a.numpy()]
        return actions

    def decide(self, z, z_last, h, obs, last, idx):  # C's move for the live envs idx (n,): (n,) action indices
        d = danger_logit(self.inputs, self.danger, self.mdn, z, z_last, obs, last)  # (n,) or None
        d = (d + danger_logit(self.inputs, None, self.mdn, *self.zm, None, None)) / 2 if self.mirror else d  # UP: UP
        return choose(self.weights if self.weights.dim() == 2 else self.weights[idx], features(z, h, self.inputs, d))


def rollout(vae, mdn, params, level_seeds, distribution_mode, inputs, max_steps=MAX_STEPS, mirror=False, danger=None):
    """Play every candidate of params (P,n_params) once on each level: -> returns (P,E), agent steps. Each env counts
    only its first episode; finished envs cost no V or M work (procgen steps them with the cheap no-op)."""
    P, E = len(params), len(level_seeds)
    envs = [make_env(P, distribution_mode, start_level=int(s), num_levels=1) for s in level_seeds]
    weights = torch.tensor(params, dtype=torch.float32).view(P, len(ACTIONS), -1).repeat(E, 1, 1)  # (E*P,5,F+1)
    agent = Agent(vae, mdn, weights, inputs, danger, mirror=mirror)
    obs = np.concatenate([e.observe()[1]["rgb"] for e in envs])  # (E*P,64,64,3): env k*P+p = candidate p, level k
    first, alive, ret, steps = np.ones(E * P, dtype=bool), np.ones(E * P, dtype=bool), np.zeros(E * P), 0
    for _ in range(max_steps):
        actions = agent.act(obs, first, alive)  # (E*P,) procgen ids
        for k, env in enumerate(envs):
            env.act(actions[k * P:(k + 1) * P])
        out = [e.observe() for e in envs]  # (reward, obs, first) per level
        rew, obs, first = (np.concatenate(x) for x in zip(*[(r, o["rgb"], f) for r, o, f in out]))  # (E*P,...) each
        ret, steps = ret + rew * alive, steps + int(alive.sum())  # only the first episode of each env counts
        # CRUCIAL: procgen auto-resets; after `first` an env is playing a new level: stop counting it.
        alive &= ~first
        if not alive.any():
            break
    return ret.reshape(E, P).T, steps  # (P,E)


def init_worker(vae, mdn, danger=""):
    """Each of vae, mdn, danger: a checkpoint's path or an open file (Ray's workers may run on other machines)."""
    if mp.current_process().name != "MainProcess":  # a pool worker (not --workers 1): Ctrl-C is the main's
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)  # one thread per process: the processes are the parallelism
    _models.update(vae=load_vae(vae), mdn=load_mdnrnn(mdn), danger=load_danger(danger) if danger else None)


def rollout_job(job):
    return rollout(_models["vae"], _models["mdn"], *job, danger=_models["danger"])


def make_pool(kind, workers, vae_path, mdn_path, danger_path=""):
    """Workers that hold the models: a ProcessPoolExecutor, whose dead worker (SIGKILL, out of memory) raises
    BrokenProcessPool at once where multiprocessing.Pool.map waits forever; or Ray's Pool, given the files' bytes."""
    if kind == "ray":
        try:
            from ray.util.multiprocessing import Pool  # its ray.init() joins RAY_ADDRESS's cluster, else starts one
        except ImportError:
            fail("--pool ray needs Ray, which is not installed: pip install ray")
        files = tuple(io.BytesIO(open(p, "rb").read()) if p else "" for p in (vae_path, mdn_path, danger_path))
        return Pool(workers, init_worker, files)
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    return ProcessPoolExecutor(workers, ctx, initializer=init_worker, initargs=(vae_path, mdn_path, danger_path))


def fitness(pool, params, level_seeds, distribution_mode, inputs, workers, max_steps=MAX_STEPS, mirror=False):
    """Mean return of each candidate over the levels split over the workers; serial (pool=None): the same."""
    chunks = [c for c in np.array_split(np.asarray(level_seeds), workers) if len(c)]
    jobs = [(params, c, distribution_mode, inputs, max_steps, mirror) for c in chunks]
    results = list((pool.map if pool else map)(rollout_job, jobs))
    return np.concatenate([r for r, _ in results], axis=1).mean(axis=1), sum(s for _, s in results)  # (P,E) -> (P,)


def cma_generation(es, evaluate):
    """One generation of CMA-ES: ask -> evaluate -> tell. evaluate(X (P,n)) -> (fitness (P,), info)."""
    X = np.array(es.ask())  # ask: popsize candidate parameter vectors
    fit, info = evaluate(X)  # evaluate: higher is better
    es.tell(list(X), (-fit).tolist())  # tell: cma minimises, so it gets minus the fitness
    return X, fit, info


def resume(es, ckpt, path):
    """CMA-ES's state rebuilt by asking and telling each stored generation again: exact (the same seed asks for the
    same candidates, checked) and nothing is unpickled. -> (generation, best, its score, env steps, history)."""
    xs, fits = list(ckpt["cma_x"].numpy()), list(ckpt["cma_fitness"].numpy())  # (P,n), (P,) each
    for g, (X, fit) in enumerate(zip(xs, fits)):
        if not np.array_equal(np.array(es.ask()), X):
            fail(f"{path}: generation {g + 1} of its CMA-ES history does not replay (another cma version?)")
        es.tell(list(X), (-fit).tolist())
    print(f"C: resumed {path} at generation {ckpt['generation']}")
    return ckpt["generation"], ckpt["params"].double().numpy(), ckpt["best_score"], ckpt["env_steps"], xs, fits


def make_search(cfg, sizes):
    """CMA-ES at its start, steps scaled by fan-in as in weight init: one d is not drowned by the 384 of z and h."""
    n_params = len(ACTIONS) * (sum(sizes.values()) + 1)
    stds = np.concatenate([np.full(n, n ** -0.5) for n in sizes.values()] + [np.ones(1)])  # (n_features+1,)
    x0 = start_point(n_params, cfg.inputs, cfg.danger_prior, cfg.start_threshold).ravel()  # (5*(n_features+1),)
    return cma.CMAEvolutionStrategy(x0, cfg.sigma0, dict(popsize=cfg.popsize, seed=cfg.seed + 1, verbose=-9,
                                    CMA_diagonal=n_params > cfg.diagonal, CMA_stds=np.tile(stds, len(ACTIONS))))


def level_draw(seed, generation, n):  # the training levels of one generation: fresh each generation, the same on resume
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
    workers = cfg.workers or os.cpu_count() or 1
    val_levels = np.random.default_rng([cfg.seed, 10**9]).integers(0, 2**31 - 1, cfg.eval_levels)
    gen, best, best_score, env_steps, history_x, history_fit = (resume(es, ckpt, cfg.out) if ckpt else
                                                                (0, es.mean.copy(), -1.0, 0, [], []))
    print(f"C: {es.N} parameters ({'diagonal' if es.opts['CMA_diagonal'] else 'full'} CMA-ES), "
          f"population {cfg.popsize} x {cfg.levels} levels, {workers} workers")
    pool = (make_pool(cfg.pool, workers, cfg.vae, cfg.mdnrnn, danger) if workers > 1 or cfg.pool == "ray"
            else init_worker(cfg.vae, cfg.mdnrnn, danger))  # --workers 1: no pool (None), the rollouts run here

    def evaluate(X, levels):  # fitness() on the pool; a pool whose worker died is replaced once, the job replayed
        nonlocal pool
        for attempt in range(2):
            try:
                return fitness(pool, X, levels, cfg.distribution_mode, cfg.inputs, workers, cfg.max_steps, cfg.mirror)
            except Exception as e:  # a dead worker: the executor's BrokenProcessPool, or Ray's actor errors
                if type(e).__name__ not in ("BrokenProcessPool", "RayActorError", "ActorDiedError"):
                    raise
                pool.terminate() if hasattr(pool, "terminate") else pool.shutdown(wait=False, cancel_futures=True)
                if attempt:
                    fail(f"fitness workers died twice in generation {gen + 1} (killed? out of memory?); "
                         f"{cfg.out} holds generation {gen}: run the same command with --resume to go on")
                print(f"C: a fitness worker died in generation {gen + 1}; replaying it on fresh workers")
                pool = make_pool(cfg.pool, workers, cfg.vae, cfg.mdnrnn, danger)

    def score(X, gen):  # fitness of a generation's candidates X (P,n): -> (P,), agent steps (real or dreamt)
        levels = level_draw(cfg.seed, gen, cfg.levels)
        if cfg.controller_env == "real":
            return evaluate(X, levels)
        first = make_env(cfg.dream_episodes, cfg.distribution_mode, seed=int(levels[0])).observe()[1]["rgb"]
        z0 = vae.encode(to_input(first))[0]  # (E,Z): dreams start from V's z of new levels' first frames
        W = torch.as_tensor(X, dtype=torch.float32).view(len(X), len(ACTIONS), -1).repeat_interleave(len(z0), 0)
        policy = lambda z, h, idx: choose(W[idx], features(z, h, cfg.inputs))  # dream p*E+e: candidate p's, start e
        ret, length = dream(mdn, policy, z0.repeat(len(X), 1), cfg.temperature)  # (P*E,) each
        return ret.view(len(X), -1).mean(1).numpy(), int(length.sum())

    try:
        if not ckpt:  # the start point is a candidate too (kept unless beaten), so C's checkpoint is always playable
            (best_score,), env_steps = evaluate(best[None], val_levels)
            tqdm.write(f"C start point val_mean {best_score:.4g} env_steps {env_steps}")
        for gen in tqdm(range(gen, cfg.generations), desc="C (CMA-ES)", unit="gen", initial=gen,
                        total=cfg.generations, disable=None):  # disable=None: a bar on a terminal only
            t0 = time.time()
            X, fit, steps = cma_generation(es, lambda X: score(X, gen))
            history_x, history_fit = history_x + [X], history_fit + [fit]
            env_steps += steps if cfg.controller_env == "real" else 0  # dream steps cost no env step
            row = dict(generation=gen + 1, best=fit.max(), mean=fit.mean(), sigma=es.sigma, seconds=time.time() - t0,
                       agent_steps_per_s=steps / (time.time() - t0), env_steps=env_steps)
            if (gen + 1) % cfg.eval_every == 0 or gen + 1 == cfg.generations:
                candidates = np.stack([es.mean, X[int(fit.argmax())]])  # a best of 16 levels is partly luck: re-test
                val, s = evaluate(candidates, val_levels)
                env_steps += s
                if cfg.controller_env == "dream":  # ... beside their dream scores: when C fools M, the two part
                    row.update(zip(("dream_mean", "dream_gen_best"), score(candidates, gen)[0]))
                if val.max() > best_score:
                    best, best_score = candidates[int(val.argmax())], val.max()
                row.update(val_mean=val[0], val_gen_best=val[1], val_best_so_far=best_score, env_steps=env_steps)
            tqdm.write("C " + " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
            config = dataclasses.asdict(cfg)
            save_atomic(dict(params=torch.as_tensor(best, dtype=torch.float32), best_score=float(best_score),
                             config=config, z_dim=vae.z_dim, hidden=mdn.hidden, generation=gen + 1,
                             env_steps=env_steps, cma_x=torch.as_tensor(np.stack(history_x)),
                             cma_fitness=torch.as_tensor(np.stack(history_fit)), made_from=made_from,
                             id=identity(config, generation=gen + 1, **made_from)), cfg.out)
            with open(os.path.splitext(cfg.out)[0] + ".jsonl", "a") as f:
                f.write(json.dumps({k: float(v) for k, v in row.items()}) + "\n")
    finally:  # stop the workers: at once after an error or Ctrl-C; after a clean run wait for them (wait=False
        if pool:  # races Python's exit hook there: "OSError: Bad file descriptor", cpython#83279). Ray's: terminate.
            pool.terminate() if hasattr(pool, "terminate") else pool.shutdown(not sys.exc_info()[0], cancel_futures=True)
    return best


if __name__ == "__main__":
    interruptible(train, cli(CConfig))
