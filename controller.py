"""C: the controller of World Models (Ha & Schmidhuber 2018, section 2.3), one linear layer + sigmoid
on [z_t, h_t] -> 5 action scores, trained by CMA-ES (the `cma` package) on the real game. With
--inputs zhd it also reads D's logit of "this UP is deadly" (danger.py), and CMA-ES starts at the
controller D implies: UP iff that logit < 0, else no-op.

Fitness rollouts are batched: one procgen env per level holds one copy of the level per candidate
(common random numbers: every candidate plays the same levels), V's encoder and M's LSTM run once
per step on all the envs still playing, and each candidate applies its own weights to its envs.
The levels are split over a multiprocessing.Pool whose workers load V and M once.

    python controller.py --vae runs/vae.pt --mdnrnn runs/mdnrnn.pt --out runs/controller.pt
    python controller.py --vae R/vae.pt --mdnrnn R/mdnrnn.pt --danger R/danger.pt --inputs zhd --out R/controller.pt
"""
import dataclasses
import json
import multiprocessing as mp
import os
import pickle
import time
from dataclasses import dataclass

import cma
import numpy as np
import torch
from tqdm import tqdm

from collect import ACTIONS, MAX_STEPS, UP, cli, fail, make_env
from danger import load_danger
from mdnrnn import load_mdnrnn
from vae import load_vae, save_atomic, to_input

NONE = 2  # index of the no-op action, played by envs whose episode is over


@dataclass
class CConfig:
    vae: str = "runs/vae.pt"  # trained V
    mdnrnn: str = "runs/mdnrnn.pt"  # trained M
    out: str = "runs/controller.pt"  # checkpoint (best parameters + CMA state); a .jsonl log beside it
    distribution_mode: str = "easy"  # procgen difficulty the controller is trained on
    generations: int = 60  # CMA-ES generations (ask -> evaluate -> tell)
    popsize: int = 32  # candidates per generation
    levels: int = 16  # episodes per candidate per generation: the same new levels for all candidates
    max_steps: int = 250  # fitness episodes stop here (easy wins take 25-100 steps; the game's cap is 500)
    sigma0: float = 0.5  # initial CMA-ES step size
    up_bias: float = 0.0  # start the search at "always UP" (UP's bias = up_bias) instead of at zero
    danger_prior: float = 1.0  # with d: start at "UP iff D's logit < 0, else no-op" (0: start at zero)
    diagonal: int = 1000  # above this many parameters use the diagonal (sep-)CMA, O(n) per step
    inputs: str = "zh"  # controller inputs: z, zh (Ha's [z, h]), zhc (adds M's cell state), zhd (adds D's danger)
    danger: str = ""  # trained D (danger.py), read when --inputs contains d
    eval_every: int = 5  # every this many generations, re-test the CMA mean and the generation's best
    eval_levels: int = 64  # ... on this many fixed validation levels; the better one is kept as "best"
    workers: int = 0  # processes for the fitness rollouts (0 = one per CPU core)
    seed: int = 0  # seeds CMA-ES and the level draws
    resume: bool = False  # continue the same search from --out


def n_inputs(inputs, z_dim, hidden):
    return sum(dict(z=z_dim, h=hidden, c=hidden, d=1)[k] for k in inputs)


def features(z, state, inputs, danger=None):
    """Controller input: z (n,Z), the LSTM state (h, c), each (1,n,H), D's logit (n,) -> (n,D)."""
    parts = {"z": z, "h": state[0][0], "c": state[1][0], "d": None if danger is None else danger[:, None]}
    return torch.cat([parts[k] for k in inputs], -1)  # (n,D)


@torch.no_grad()
def agent_step(vae, mdn, weights, obs, state, inputs, last=None, danger=None):
    """One step of V -> C -> M for a batch of envs.

    obs uint8 (n,64,64,3); weights: see choose(); state (h, c) each (1,n,H) = M's memory of the
    past; last (n,64,64,3): the frame before obs, for D (danger) when inputs contain d.
    Returns action indices (n,) and the advanced state."""
    z = vae.encode(to_input(obs))[0]  # (n,Z): mu, no sampling at control time (as Ha)
    d = danger(obs, last).clamp(-10, 10) if "d" in inputs else None  # (n,) logit of "UP is deadly"
    action = choose(weights, features(z, state, inputs, d))
    return action, mdn.advance(z, action, state)


def choose(weights, f):
    """C itself: weights (n,5,D+1) (each env its own controller; bias last) or (5,D+1) (one for all),
    inputs f (n,D) -> action indices (n,)."""
    weights = weights.expand(len(f), -1, -1)  # (n,5,D+1)
    scores = torch.sigmoid(torch.einsum("nad,nd->na", weights[..., :-1], f) + weights[..., -1])  # (n,5)
    return scores.argmax(-1)  # sigmoid is monotonic: argmax of the linear scores, as in the seed


def rollout(vae, mdn, params, level_seeds, distribution_mode, inputs, max_steps=MAX_STEPS, danger=None):
    """Play every candidate of params (P, n_params) once on each level. Returns (P, E) returns and
    the number of agent steps. Each env counts only its first episode; finished envs cost no
    encoder or LSTM work (procgen still steps them, with the no-op, which is cheap)."""
    P, E = len(params), len(level_seeds)
    envs = [make_env(P, distribution_mode, start_level=int(s), num_levels=1) for s in level_seeds]
    weights = torch.as_tensor(params, dtype=torch.float32).view(P, len(ACTIONS), -1).repeat(E, 1, 1)  # (E*P,5,D+1)
    H = mdn.hidden
    h, c = torch.zeros(1, E * P, H), torch.zeros(1, E * P, H)
    obs = np.concatenate([e.observe()[1]["rgb"] for e in envs])  # (E*P,64,64,3): env k*P+p = candidate p, level k
    alive, ret, steps = np.ones(E * P, dtype=bool), np.zeros(E * P), 0
    last = obs  # D's "last frame" on the first step is the first frame itself
    for _ in range(max_steps):
        idx = np.flatnonzero(alive)
        a, (h_new, c_new) = agent_step(vae, mdn, weights[idx], obs[idx], (h[:, idx], c[:, idx]), inputs,
                                       last[idx], danger)
        h[:, idx], c[:, idx], last = h_new, c_new, obs
        actions = np.full(E * P, NONE)
        actions[idx] = a.numpy()
        for k, env in enumerate(envs):
            env.act(ACTIONS[actions[k * P:(k + 1) * P]])
        out = [e.observe() for e in envs]
        rew = np.concatenate([o[0] for o in out])
        first = np.concatenate([o[2] for o in out])
        obs = np.concatenate([o[1]["rgb"] for o in out])
        ret[idx] += rew[idx]
        steps += len(idx)
        # CRUCIAL: procgen auto-resets; after `first` an env is playing a new level: stop counting it.
        alive &= ~first
        if not alive.any():
            break
    return ret.reshape(E, P).T, steps  # (P,E)


_models = {}  # each Pool worker loads V and M once


def init_worker(vae_path, mdn_path, danger_path=""):
    torch.set_num_threads(1)  # one thread per process: the processes are the parallelism
    _models["vae"], _models["mdn"] = load_vae(vae_path), load_mdnrnn(mdn_path)
    _models["danger"] = load_danger(danger_path) if danger_path else None


def rollout_job(job):
    return rollout(_models["vae"], _models["mdn"], *job, danger=_models["danger"])


def fitness(pool, params, level_seeds, distribution_mode, inputs, workers, max_steps=MAX_STEPS):
    """Mean return of each candidate over the levels, the levels split over the workers. A serial
    run (pool=None) makes the same jobs, so it gives exactly the same numbers."""
    chunks = [c for c in np.array_split(np.asarray(level_seeds), workers) if len(c)]
    jobs = [(params, c, distribution_mode, inputs, max_steps) for c in chunks]
    results = pool.map(rollout_job, jobs) if pool else list(map(rollout_job, jobs))
    returns = np.concatenate([r for r, _ in results], axis=1)  # (P,E)
    return returns.mean(axis=1), sum(s for _, s in results)


def cma_generation(es, evaluate):
    """One generation of CMA-ES: ask -> evaluate -> tell. evaluate(X (P,n)) -> (fitness (P,), info)."""
    X = np.array(es.ask())  # ask: popsize candidate parameter vectors
    F, info = evaluate(X)  # evaluate: higher is better
    es.tell(list(X), (-F).tolist())  # tell: cma minimises, so it gets minus the fitness
    return X, F, info


def start_point(n_params, inputs, up_bias=0.0, danger_prior=0.0):
    """CMA-ES's first mean, (5, D+1) with the bias last: zero, plus priors the search can leave.
    up_bias: always UP (the best constant action). danger_prior: the controller D implies, "UP iff
    D's logit < 0, else no-op"; in hard mode CMA-ES from zero did not find it in 30 generations."""
    x0 = np.zeros((len(ACTIONS), n_params // len(ACTIONS)))  # (5,D+1)
    x0[UP, -1] = up_bias
    if "d" in inputs:
        x0[UP, -2] = -danger_prior  # d is the last input, just before the bias
        x0[[a for a in range(len(ACTIONS)) if a not in (UP, NONE)], -1] -= danger_prior  # else NONE wins
    return x0


def level_draw(seed, generation, n):
    """Training levels of one generation: fresh each generation, the same on resume."""
    return np.random.default_rng([seed, generation]).integers(0, 2**31 - 1, n)


def train(cfg):
    os.makedirs(os.path.dirname(os.path.abspath(cfg.out)), exist_ok=True)
    if os.path.exists(cfg.out) and not cfg.resume:
        fail(f"--out {cfg.out} exists; pass --resume true to continue it, or choose another path")
    if cfg.inputs not in ("z", "zh", "zhc", "zhd"):
        fail(f"--inputs {cfg.inputs!r}: expected z, zh, zhc or zhd")
    if ("d" in cfg.inputs) != bool(cfg.danger):
        fail(f"--inputs {cfg.inputs} with --danger {cfg.danger!r}: d and a D checkpoint go together")
    for flag, path in [("--vae", cfg.vae), ("--mdnrnn", cfg.mdnrnn)] + ([("--danger", cfg.danger)] if cfg.danger else []):
        if not os.path.exists(path):
            fail(f"{flag} {path}: no such checkpoint")
    ckpt = torch.load(cfg.out, map_location="cpu", weights_only=True) if cfg.resume and os.path.exists(cfg.out) else None
    if ckpt and ckpt["generation"] >= cfg.generations:
        print(f"C: {cfg.out} already has {cfg.generations} generations, skipping")
        return ckpt["params"].numpy()
    vae, mdn = load_vae(cfg.vae), load_mdnrnn(cfg.mdnrnn)
    n_params = len(ACTIONS) * (n_inputs(cfg.inputs, vae.z_dim, mdn.hidden) + 1)
    workers = cfg.workers or os.cpu_count() or 1
    # Seeding, in one place: CMA-ES's sampling and the level draws (levels come from level_draw).
    opts = dict(popsize=cfg.popsize, seed=cfg.seed + 1, CMA_diagonal=n_params > cfg.diagonal, verbose=-9)
    x0 = start_point(n_params, cfg.inputs, cfg.up_bias, cfg.danger_prior)
    # Fan-in scaling, as in weight init: each input group (z: 128 numbers, h: 256, d: 1) starts
    # with the same say in C's scores, so one danger number is not drowned by 384 others.
    sizes = dict(z=vae.z_dim, h=mdn.hidden, c=mdn.hidden, d=1)
    stds = np.concatenate([np.full(sizes[k], sizes[k] ** -0.5) for k in cfg.inputs] + [np.ones(1)])  # (D+1,)
    opts["CMA_stds"] = np.tile(stds, len(ACTIONS))  # (5*(D+1),), the order of x0.ravel()
    es = cma.CMAEvolutionStrategy(x0.ravel(), cfg.sigma0, opts)
    val_levels = np.random.default_rng([cfg.seed, 10**9]).integers(0, 2**31 - 1, cfg.eval_levels)
    gen, best, best_score, env_steps = 0, np.zeros(n_params), -1.0, 0
    if ckpt:
        # The CMA state is a pickle inside our own checkpoint: resume only runs you made yourself.
        es = pickle.loads(ckpt["cma_state"].numpy().tobytes())
        gen, best, best_score = ckpt["generation"], ckpt["params"].double().numpy(), ckpt["best_score"]
        env_steps = ckpt["env_steps"]
    print(f"C: {n_params} parameters ({'diagonal' if opts['CMA_diagonal'] else 'full'} CMA-ES), "
          f"population {cfg.popsize} x {cfg.levels} levels, {workers} workers")
    log = os.path.splitext(cfg.out)[0] + ".jsonl"
    task = (cfg.distribution_mode, cfg.inputs, workers, cfg.max_steps)
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    pool = ctx.Pool(workers, init_worker, (cfg.vae, cfg.mdnrnn, cfg.danger)) if workers > 1 else None
    if pool is None:
        init_worker(cfg.vae, cfg.mdnrnn, cfg.danger)
    try:
        for gen in tqdm(range(gen, cfg.generations), desc="C (CMA-ES)", unit="gen", initial=gen, total=cfg.generations):
            t0 = time.time()
            levels = level_draw(cfg.seed, gen, cfg.levels)
            X, F, steps = cma_generation(es, lambda X: fitness(pool, X, levels, *task))
            env_steps += steps
            row = dict(generation=gen + 1, best=F.max(), mean=F.mean(), sigma=es.sigma, seconds=time.time() - t0,
                       agent_steps_per_s=steps / (time.time() - t0), env_steps=env_steps)
            if (gen + 1) % cfg.eval_every == 0 or gen + 1 == cfg.generations:
                # A generation's best is partly luck on 16 levels: re-test it and the mean on more.
                cands = np.stack([es.mean, X[int(F.argmax())]])
                V, s = fitness(pool, cands, val_levels, *task)
                env_steps += s
                row.update(val_mean=V[0], val_gen_best=V[1], env_steps=env_steps)
                if V.max() > best_score:
                    best, best_score = cands[int(V.argmax())], V.max()
                row["val_best_so_far"] = best_score
            tqdm.write("C " + " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
            state = torch.frombuffer(bytearray(pickle.dumps(es)), dtype=torch.uint8)
            save_atomic(dict(params=torch.as_tensor(best, dtype=torch.float32), best_score=float(best_score),
                             config=dataclasses.asdict(cfg), z_dim=vae.z_dim, hidden=mdn.hidden,
                             generation=gen + 1, env_steps=env_steps, cma_state=state), cfg.out)
            with open(log, "a") as f:
                f.write(json.dumps({k: float(v) for k, v in row.items()}) + "\n")
    finally:
        if pool:
            pool.terminate()
    return best


if __name__ == "__main__":
    train(cli(CConfig))
