"""Launch `q-tuning-train` on a Ray cluster: one actor per training process, slime-style.

    # on a GPU cluster (ray start --head on node 0, ray start --address=... on the others):
    ray job submit -- python -m q_tuning.sft.train.ray_launcher \\
        --actor-num-nodes 2 --actor-num-gpus-per-node 8 <q-tuning-train flags>

    # CPU only, a local Ray cluster started here, gloo:
    python -m q_tuning.sft.train.ray_launcher --ray-num-cpus 2 \\
        --actor-num-nodes 1 --actor-num-gpus-per-node 2 --device cpu <q-tuning-train flags>

A packed placement group holds one bundle per process (`{"GPU": 1, "CPU": c}`, or `{"CPU": c}` on
CPU); one actor per bundle. Ranks are given in (node, GPU) order so that each node's processes are
consecutive; every actor gets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE and MASTER_ADDR /
MASTER_PORT (rank 0's node and a port free there), then runs the trainer's `main(argv)` in its
own process. On a cluster without GPUs, "GPUs per node" means processes per node and the trainer
runs with `--device cpu` (gloo).

Failures: the launcher waits for the actors one by one; as soon as one fails (a non-zero status,
an exception, or its process died) it gives the others `_GRACE_SECONDS` to end by themselves
(they usually do: their next collective fails), then kills them and exits with a non-zero status,
so a lost process never leaves the job hanging.

Flags of the launcher (all others go to the trainer unchanged):
    --actor-num-nodes N, --actor-num-gpus-per-node G   world size N x G
    --ray-address ADDR    cluster to join (default: $RAY_ADDRESS, else start a local one)
    --ray-num-cpus C      CPUs of a local cluster started here (default: all)
    --num-cpus-per-actor C  (default 1)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional, Sequence

from q_tuning.config import CommandLineParser
from q_tuning.parallel.process_group import free_port

__all__ = ["main", "launch"]

_GRACE_SECONDS = 10.0


def _parser() -> argparse.ArgumentParser:
    parser = CommandLineParser(
        prog="python -m q_tuning.sft.train.ray_launcher",
        description="Run q-tuning-train with one Ray actor per process (other flags are passed "
                    "to the trainer).")
    parser.add_argument("--actor-num-nodes", type=int, default=1)
    parser.add_argument("--actor-num-gpus-per-node", type=int, default=1,
                        help="processes per node (one GPU each; on CPU: CPU processes)")
    parser.add_argument("--ray-address", default=None)
    parser.add_argument("--ray-num-cpus", type=int, default=None)
    parser.add_argument("--num-cpus-per-actor", type=float, default=1.0)
    return parser


class _TrainerProcess:
    """The body of one Ray actor: reports where it runs, then runs the trainer."""

    def where(self) -> tuple[str, list]:
        import ray

        gpu_ids = ray.get_gpu_ids() if ray.is_initialized() else []
        return ray.util.get_node_ip_address(), sorted(int(g) for g in gpu_ids)

    def free_port(self) -> int:
        return free_port("")

    def run(self, env: dict[str, str], argv: list[str]) -> int:
        os.environ.update(env)
        from q_tuning.sft.train.__main__ import main

        try:
            main(argv)
        except SystemExit as exc:  # the trainer's bad-input exit: report the status
            return int(exc.code or 0)
        return 0


def launch(num_nodes: int, procs_per_node: int, trainer_argv: Sequence[str], *,
           ray_address: Optional[str] = None, ray_num_cpus: Optional[int] = None,
           cpus_per_actor: float = 1.0) -> int:
    """Start the actors, run the trainer in each, return the worst exit status."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    world = num_nodes * procs_per_node
    address = ray_address or os.environ.get("RAY_ADDRESS")
    # Actors import the trainer from wherever this launcher imported it.
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    runtime_env = {"env_vars": {"PYTHONPATH": os.pathsep.join(
        p for p in (package_root, os.environ.get("PYTHONPATH")) if p)}}
    ray.init(address=address, num_cpus=None if address else ray_num_cpus,
             runtime_env=runtime_env, log_to_driver=True)
    try:
        use_gpu = (ray.cluster_resources().get("GPU", 0) >= 1
                   and _device(trainer_argv) != "cpu")
        argv = list(trainer_argv)
        if not use_gpu and _device(trainer_argv) is None:
            argv += ["--device", "cpu"]
        bundle = {"CPU": cpus_per_actor, **({"GPU": 1} if use_gpu else {})}
        group = placement_group([dict(bundle) for _ in range(world)], strategy="PACK")
        ray.get(group.ready(), timeout=600)
        actor_cls = ray.remote(_TrainerProcess)
        actors = [actor_cls.options(
            num_cpus=cpus_per_actor, num_gpus=1 if use_gpu else 0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=group, placement_group_bundle_index=i)).remote()
            for i in range(world)]
        where = ray.get([a.where.remote() for a in actors])
        # ranks in (node, GPU) order: each node's processes consecutive, rank 0's node first
        nodes = list(dict.fromkeys(ip for ip, _ in where))
        order = sorted(range(world), key=lambda i: (nodes.index(where[i][0]), where[i][1], i))
        master_addr = where[order[0]][0]
        master_port = ray.get(actors[order[0]].free_port.remote())
        runs, rank_actors = [], []
        for rank, i in enumerate(order):
            same_node = [j for j in order if where[j][0] == where[i][0]]
            env = {"RANK": str(rank), "WORLD_SIZE": str(world),
                   "LOCAL_RANK": str(same_node.index(i)),
                   "LOCAL_WORLD_SIZE": str(len(same_node)),
                   "MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port)}
            if not use_gpu:
                env["TORCHDYNAMO_DISABLE"] = "1"
            runs.append(actors[i].run.remote(env, argv))
            rank_actors.append(actors[i])
        status = _wait_for_ranks(ray, runs, rank_actors)
        remove_placement_group(group)
        return status
    finally:
        ray.shutdown()


def _wait_for_ranks(ray, runs: list, actors: list) -> int:
    """The worst exit status of the ranks (`runs[r]` is rank r's run, on `actors[r]`). After
    the first failure the others get `_GRACE_SECONDS` to end, then are killed (status 1 for a
    rank that raised or died)."""
    rank_of = {ref: rank for rank, ref in enumerate(runs)}
    pending, status, failed = list(runs), 0, []
    deadline = None
    while pending:
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        done, pending = ray.wait(pending, num_returns=1, timeout=timeout)
        if not done:  # the grace period is over
            print(f"ray_launcher: rank(s) {failed} failed; killing rank(s) "
                  f"{sorted(rank_of[r] for r in pending)}, still running", file=sys.stderr,
                  flush=True)
            for ref in pending:
                ray.kill(actors[rank_of[ref]], no_restart=True)
            return max(status, 1)
        for ref in done:
            try:
                code = int(ray.get(ref))
            except Exception as err:  # the actor raised or its process died
                lines = str(err).strip().splitlines()
                print(f"ray_launcher: rank {rank_of[ref]} failed: "
                      f"{lines[-1] if lines else type(err).__name__}", file=sys.stderr,
                      flush=True)
                code = 1
            status = max(status, code)
            if code != 0:
                failed.append(rank_of[ref])
                if deadline is None:
                    deadline = time.monotonic() + _GRACE_SECONDS
    return status


def _device(argv: Sequence[str]) -> Optional[str]:
    for i, arg in enumerate(argv):
        if arg == "--device" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--device="):
            return arg.split("=", 1)[1]
    return None


def main(argv: Optional[Sequence[str]] = None) -> None:
    from q_tuning.sft.train.arguments import parse_args

    ours, trainer_argv = _parser().parse_known_args(argv)
    if ours.actor_num_nodes < 1 or ours.actor_num_gpus_per_node < 1:
        _parser().error("--actor-num-nodes and --actor-num-gpus-per-node must be >= 1")
    parse_args(trainer_argv)  # bad trainer flags fail here, before Ray starts
    sys.exit(launch(ours.actor_num_nodes, ours.actor_num_gpus_per_node, trainer_argv,
                    ray_address=ours.ray_address, ray_num_cpus=ours.ray_num_cpus,
                    cpus_per_actor=ours.num_cpus_per_actor))


if __name__ == "__main__":
    main()
