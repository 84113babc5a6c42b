"""Ray execution: the same bits as a serial run whatever the worker count and order; a killed worker is retried.

One local Ray (2 CPUs) serves the whole module: Ray's start-up costs seconds.
"""

import json

import pytest
import torch
from tiny_models import save_tiny_model

import melbo
import melbo.jobs.sweep as sweeping
from melbo.engine.distributed import RayPool, check_address
from melbo.errors import MelboError
from melbo.jobs.layermap import compute_pair, encode_for, make_settings, pair_task

PROMPTS = ["The cat sat on", "Tell me a story"]


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return melbo.load_model(str(save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")))


@pytest.fixture(scope="module")
def ray_local():
    import logging

    ray = pytest.importorskip("ray")
    from melbo.threads import allowed_cores

    if len(allowed_cores()) < 2:  # melbo refuses more local workers than cores (the pool's own check)
        pytest.skip("two local Ray workers need two cores; this process may use one")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    yield ray
    ray.shutdown()


@pytest.mark.ray
def test_two_workers_give_the_serial_bits(lm, ray_local, tmp_path):
    serial = melbo.map(lm, PROMPTS, "0:2", "1:3", k=2, out=tmp_path / "serial", iterations=3)
    events = []
    ray_map = melbo.map(lm, PROMPTS, "0:2", "1:3", k=2, out=tmp_path / "ray", iterations=3, workers=2,
                        progress=events.append)
    for name, value in serial.tensors.items():
        assert torch.equal(ray_map.tensors[name].nan_to_num(-1), value.nan_to_num(-1)), name
    assert json.loads((tmp_path / "ray" / "ranking.json").read_text()) == serial.ranking()
    pairs = [e for e in events if e["stage"] == "pair"]
    assert [e["done"] for e in pairs] == list(range(1, 7))
    assert len({e["worker"] for e in pairs}) == 2  # both workers took pairs


@pytest.mark.ray
def test_a_killed_worker_is_restarted_and_the_job_completes(lm, ray_local):
    settings = make_settings(lm, PROMPTS, "0:2", "1:3", 2, 2, 0, None, "all")
    pool = RayPool.check(2, None)
    results, killed = {}, []

    def on_result(result):
        results[(result.source, result.target)] = result
        if not killed:  # kill every worker, each mid-job: Ray restarts them and re-runs their unfinished tasks
            for actor in pool.actors:
                ray_local.kill(actor, no_restart=False)
            killed.append(result.worker)

    pool.run(lm, pair_task, [(settings, s, t) for s, t in settings.pairs], on_result)
    assert sorted(results) == sorted(settings.pairs)
    restarted = {ray_local.get(a.pid.remote()) for a in pool.actors}
    assert killed and killed[0] not in restarted
    assert restarted & {r.worker for r in results.values()}, "no result came from a restarted worker"
    batch = encode_for(lm, settings)
    for (s, t), result in results.items():
        assert torch.equal(result.directions, compute_pair(lm, batch, s, t, settings).directions)


@pytest.mark.ray
def test_sweep_points_on_two_workers_match_the_serial_sweep(lm, ray_local, tmp_path):
    kw = dict(n_vectors=2, steps=3, source=1, target=3, max_new_tokens=4, chat=False)
    serial = sweeping.sweep(lm, PROMPTS[:1], ["0.1x", "0.5x"], out=tmp_path / "serial", **kw)
    events = []
    on_ray = sweeping.sweep(lm, PROMPTS[:1], ["0.1x", "0.5x"], out=tmp_path / "ray", workers=2,
                               progress=events.append, **kw)
    assert on_ray == serial
    assert sorted(e["point"] for e in events if e["stage"] == "done") == [1, 2]


def test_bad_worker_counts_and_addresses_fail_fast():
    with pytest.raises(MelboError, match="more than this machine's"):
        RayPool.check(10_000, None)
    with pytest.raises(MelboError, match="≥ 1"):
        RayPool.check(0, None)
    with pytest.raises(MelboError, match="cannot reach a Ray cluster"):
        check_address("127.0.0.1:1")  # nothing listens on port 1
    with pytest.raises(MelboError, match="not host:port"):
        check_address("nowhere")
