"""The merge loop's policies: which tasks stream in chunks and go first, and how far loads run
ahead of the merge."""

from types import SimpleNamespace

import torch
from checkpoints import tiny_pair

from fusion_kernels import params_for
from fusion_kernels.params import TensorParams
from fusion_kernels.pipeline import plan_merge
from fusion_kernels.streaming.chunks import Budget
from fusion_kernels.streaming.host import HostTransport
from fusion_kernels.streaming.loop import MergeLoop, ReadAhead


def loop_for(tmp_path, budget, chunked) -> MergeLoop:
    base, tuned = tiny_pair(tmp_path / "in", vocab=4096)
    base_ckpt, tuned_ckpt, plan = plan_merge(base, tuned)
    transport = HostTransport(torch.device("cpu"))
    params = TensorParams(params_for("ties"))
    return MergeLoop(
        plan, base_ckpt, tuned_ckpt, None, params, None, transport, budget=budget, chunked=chunked
    )


def test_tasks_over_the_budget_stream_first_and_the_rest_keep_output_order(tmp_path):
    loop = loop_for(tmp_path, Budget(2**20), chunked=object())
    output = [name for shard in loop.plan.shards for name in shard.names]
    streamed = [name for name in output if name in loop.streamed]
    assert streamed and "model.embed_tokens.weight" in streamed
    assert [t.name for t in loop.order] == streamed + [n for n in output if n not in streamed]
    assert all(loop.plan.tasks[n].tuned.nbytes * 6 > 2**20 for n in streamed)


def test_without_a_chunked_op_every_task_is_whole(tmp_path):
    loop = loop_for(tmp_path, Budget(2**20), chunked=None)
    assert loop.streamed == set()
    assert [t.name for t in loop.order] == [n for s in loop.plan.shards for n in s.names]


def test_read_ahead_stops_at_its_limit_and_passes_over_a_chunked_task():
    order = [SimpleNamespace(tuned=SimpleNamespace(nbytes=10), chunked=i == 4) for i in range(7)]
    order[4].tuned.nbytes = 1000  # loads nothing ahead, so it counts for nothing
    submitted = []

    def submit(index):
        submitted.append(index)
        return None

    ahead = ReadAhead(order, lambda t: not t.chunked, submit, 40)
    assert submitted == [0, 1]  # the next task, and pairs within 40 bytes ahead
    ahead.loads.pop(0)
    ahead.fill(0)
    assert submitted == [0, 1, 2]
    ahead.fill(2)
    assert submitted == [0, 1, 2, 3, 4, 5]  # past the chunked task, as if it were not there
    ahead.fill(3)
    assert submitted == [0, 1, 2, 3, 4, 5, 6]
