"""The machine budget from fake /proc, /sys and cgroup trees; sizes and keep_alive as users
write them; how the cores are divided; what a model's files say about its memory."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from gateway.config import parse_keep_alive
from gateway.manager.budget import Machine
from gateway.manager.cpu import Demand, divide
from gateway.manager.footprint import FootprintBook, estimate
from gateway.manager.modelfiles import ModelFileError, read_gguf
from gateway.units import GIB, MIB, format_size, parse_size
from tests.conftest import write_model

KIB = 1024


def fake_machine(
    root: Path,
    *,
    cores: list[tuple[int, int]],
    available_kib: int,
    cgroup: str = "0::/",
    affinity: set[int] | None = None,
) -> Machine:
    """CPUs with (package, core) ids, a meminfo, and an empty cgroup mount."""
    sys_cpu = root / "sys" / "cpu"
    for index, (package, core) in enumerate(cores):
        topology = sys_cpu / f"cpu{index}" / "topology"
        topology.mkdir(parents=True)
        (topology / "physical_package_id").write_text(f"{package}\n")
        (topology / "core_id").write_text(f"{core}\n")
    proc = root / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "meminfo").write_text(
        f"MemTotal:       {available_kib * 2} kB\nMemFree:        1000 kB\n"
        f"MemAvailable:   {available_kib} kB\n"
    )
    (proc / "self" / "cgroup").write_text(cgroup + "\n")
    (root / "cgroup").mkdir()
    return Machine(
        proc=proc,
        sys_cpu=sys_cpu,
        cgroup_root=root / "cgroup",
        affinity=affinity if affinity is not None else set(range(len(cores))),
    )


def test_physical_cores_count_once_whatever_their_siblings(tmp_path: Path) -> None:
    # 8 logical CPUs: 4 cores with two hardware threads each.
    layout = [(0, core) for core in (0, 1, 2, 3, 0, 1, 2, 3)]
    machine = fake_machine(tmp_path, cores=layout, available_kib=16 * 1024 * 1024)
    budget = machine.budget()
    assert budget.cores == 4
    assert budget.cores_from == "4 physical of 8 logical CPU(s)"


def test_only_the_cpus_this_process_may_use_count(tmp_path: Path) -> None:
    layout = [(0, 0), (0, 1), (0, 2), (0, 3), (0, 0), (0, 1), (0, 2), (0, 3)]
    machine = fake_machine(tmp_path, cores=layout, available_kib=GIB // KIB, affinity={0, 4, 1})
    assert machine.budget().cores == 2


def test_a_cgroup_v2_quota_and_memory_limit_are_respected(tmp_path: Path) -> None:
    machine = fake_machine(
        tmp_path,
        cores=[(0, i) for i in range(4)],
        available_kib=20 * GIB // KIB,
        cgroup="0::/hearth.slice/gateway",
    )
    root = tmp_path / "cgroup"
    (root / "cgroup.controllers").write_text("cpu memory\n")
    leaf = root / "hearth.slice" / "gateway"
    leaf.mkdir(parents=True)
    (leaf / "cpu.max").write_text("150000 100000\n")  # one and a half CPUs
    (leaf / "memory.max").write_text(f"{4 * GIB}\n")
    (leaf / "memory.current").write_text(f"{GIB}\n")
    (leaf / "memory.stat").write_text(f"anon 1000\ninactive_file {GIB // 2}\n")
    (root / "hearth.slice" / "cpu.max").write_text("max 100000\n")
    (root / "hearth.slice" / "memory.max").write_text("max\n")
    budget = machine.budget()
    assert budget.cores == 1
    assert budget.cores_from == "4 physical of 4 logical CPU(s), cgroup quota 1.5 CPUs"
    # 4 GiB limit less the 0.5 GiB in use (page cache aside), less the 512 MiB reserve.
    assert budget.memory_bytes == 3 * GIB
    assert budget.memory_from == "cgroup limit 3.5 GiB less 512 MiB reserve"


def test_a_cgroup_v1_limit_in_a_namespace(tmp_path: Path) -> None:
    machine = fake_machine(
        tmp_path,
        cores=[(0, 0), (0, 1)],
        available_kib=20 * GIB // KIB,
        cgroup="5:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc",
    )
    # Inside a container the cgroup's own folder is the mount's root.
    memory = tmp_path / "cgroup" / "memory"
    memory.mkdir()
    (memory / "memory.limit_in_bytes").write_text(f"{8 * GIB}\n")
    (memory / "memory.usage_in_bytes").write_text(f"{2 * GIB}\n")
    (memory / "memory.stat").write_text(f"total_inactive_file {GIB}\n")
    cpu = tmp_path / "cgroup" / "cpu,cpuacct"
    cpu.mkdir()
    (cpu / "cpu.cfs_quota_us").write_text("-1\n")
    (cpu / "cpu.cfs_period_us").write_text("100000\n")
    budget = machine.budget()
    assert budget.cores == 2
    # 8 GiB less 1 GiB used; then 10 % kept back.
    assert budget.memory_bytes == 7 * GIB - int(7 * GIB * 0.1)


def test_memory_available_less_a_reserve_and_the_overrides(tmp_path: Path) -> None:
    machine = fake_machine(tmp_path, cores=[(0, 0), (0, 1)], available_kib=10 * GIB // KIB)
    budget = machine.budget()
    assert budget.memory_bytes == 9 * GIB
    assert budget.memory_from == "MemAvailable 10.0 GiB less 1.0 GiB reserve"
    forced = machine.budget(cpus=6, memory=2 * GIB)
    assert (forced.cores, forced.memory_bytes) == (6, 2 * GIB)
    assert (forced.cores_from, forced.memory_from) == ("HEARTH_CPUS", "HEARTH_MEMORY")
    assert forced.describe() == (
        "machine budget: 6 core(s) (HEARTH_CPUS); 2.0 GiB of memory for models (HEARTH_MEMORY)"
    )


def test_this_machine_has_a_budget() -> None:
    import os

    machine = Machine()
    budget = machine.budget()
    assert 1 <= budget.cores <= (os.cpu_count() or 1)
    total = machine.meminfo()["MemTotal"]
    assert 0 < budget.memory_bytes < total


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("8G", 8 * GIB),
        ("8GiB", 8 * GIB),
        ("8 GB", 8 * GIB),
        ("1.5g", int(1.5 * GIB)),
        ("512M", 512 * MIB),
        ("512Mi", 512 * MIB),
        ("1073741824", GIB),
        (4096, 4096),
    ],
)
def test_sizes(text: str | int, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["lots", "8X", "-1G", "G", "8 iB", -5, True])
def test_bad_sizes(text: str | int) -> None:
    with pytest.raises(ValueError, match="not a size"):
        parse_size(text)


def test_sizes_read_as_people_do() -> None:
    assert format_size(3 * GIB // 2) == "1.5 GiB"
    assert format_size(300 * MIB) == "300 MiB"


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("5m", 300.0), ("30s", 30.0), ("1h", 3600.0), (90, 90.0), (0, 0.0), ("0", 0.0),
     (-1, math.inf), ("-1", math.inf), ("-5m", math.inf), (2.5, 2.5),
     ("1h30m", 5400.0), ("5m0s", 300.0), (1e300, math.inf), ("99999999999999h", math.inf)],
)  # fmt: skip
def test_keep_alive_values(value: str | int | float, seconds: float) -> None:
    assert parse_keep_alive(value) == seconds


@pytest.mark.parametrize("value", ["soon", "5 parsecs", True, "", "--1"])
def test_bad_keep_alive_values(value: str | bool) -> None:
    with pytest.raises(ValueError, match="keep_alive"):
        parse_keep_alive(value)


def test_one_model_computing_gets_every_core() -> None:
    assert divide(8, [Demand(8, True)]) == [8]


def test_two_models_computing_share_the_cores() -> None:
    assert divide(2, [Demand(2, True), Demand(2, True)]) == [1, 1]
    assert divide(8, [Demand(8, True), Demand(8, True)]) == [4, 4]


def test_a_ceiling_leaves_its_cores_to_the_others() -> None:
    assert divide(8, [Demand(2, True), Demand(8, True), Demand(8, True)]) == [2, 3, 3]


def test_fixed_engines_keep_their_threads_and_the_others_share_the_rest() -> None:
    assert divide(8, [Demand(4, False), Demand(8, True), Demand(8, True)]) == [4, 2, 2]
    # Every adjustable model computes with at least one thread, even on a full machine.
    assert divide(2, [Demand(2, False), Demand(2, True)]) == [2, 1]
    assert divide(2, [Demand(2, True)] * 3) == [1, 1, 1]


def test_the_gguf_header_is_read_without_loading(tiny_gguf: Path) -> None:
    import gguf

    header = read_gguf(tiny_gguf)
    reference = gguf.GGUFReader(tiny_gguf)
    assert header.architecture == "llama"
    assert header.get("block_count") == 2
    assert header.get("embedding_length") == 64
    assert header.tensor_count == len(reference.tensors)
    assert header.tensor_bytes == sum(int(t.n_bytes) for t in reference.tensors)
    assert header.metadata["tokenizer.ggml.tokens"] == len(
        reference.fields["tokenizer.ggml.tokens"].data
    )


def test_files_that_are_not_gguf_are_named(tmp_path: Path, tiny_gguf: Path) -> None:
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a model at all, just some bytes")
    with pytest.raises(ModelFileError, match=r"junk\.gguf is not a GGUF file"):
        read_gguf(junk)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_gguf.read_bytes()[:200])
    with pytest.raises(ModelFileError, match="ends early"):
        read_gguf(cut)


def test_a_longer_context_needs_more_memory(tmp_path: Path, tiny_gguf: Path) -> None:
    from gateway.config import load_model_file

    (tmp_path / "m.gguf").write_bytes(tiny_gguf.read_bytes())
    short = load_model_file(
        write_model(tmp_path, "short", "backend: llama\nmodel: m.gguf\ncontext_size: 1024"),
        tmp_path,
    )
    long = load_model_file(
        write_model(tmp_path, "long", "backend: llama\nmodel: m.gguf\ncontext_size: 8192"),
        tmp_path,
    )
    one = load_model_file(
        write_model(
            tmp_path, "one", "backend: llama\nmodel: m.gguf\ncontext_size: 8192\nparallel: 1"
        ),
        tmp_path,
    )
    a, b, c = estimate(short, tmp_path), estimate(long, tmp_path), estimate(one, tmp_path)
    # 2 layers x 2 KV heads x (16 + 16) values x 2 bytes per position, for each of the 4
    # generations computed together by default.
    assert b.parts["kv_cache"] - a.parts["kv_cache"] == (8192 - 1024) * 2 * 2 * 32 * 2 * 4
    assert c.parts["kv_cache"] == b.parts["kv_cache"] // 4
    assert b.parts["weights"] == a.parts["weights"] == read_gguf(tiny_gguf).tensor_bytes
    assert b.bytes > a.bytes


def test_what_was_measured_replaces_the_estimate_until_the_files_change(
    tmp_path: Path, tiny_gguf: Path
) -> None:
    from gateway.config import load_model_file

    (tmp_path / "m.gguf").write_bytes(tiny_gguf.read_bytes())
    config = load_model_file(write_model(tmp_path, "m", "backend: llama\nmodel: m.gguf"), tmp_path)
    book = FootprintBook(tmp_path)
    assert book.footprint(config).source == "estimate"
    book.record(config, 123 * MIB)
    book.record(config, 100 * MIB)  # a lighter run does not lower what was seen
    measured = FootprintBook(tmp_path).footprint(config)
    assert (measured.source, measured.bytes) == ("measured", 123 * MIB)
    (tmp_path / "m.gguf").write_bytes(tiny_gguf.read_bytes() + b"\0" * 64)  # a new file
    assert book.footprint(config).source == "estimate"
    book.forget("m")
    assert not (tmp_path / ".hearth").exists()


def test_model_files_that_lie_still_get_an_estimate(tmp_path: Path) -> None:
    import json
    import struct

    from gateway.config import load_model_file

    folder = tmp_path / "odd"
    folder.mkdir()
    header = json.dumps({"w": {"dtype": "F32", "shape": None, "data_offsets": [0, 4]}}).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    config = load_model_file(
        write_model(tmp_path, "odd", "backend: transformers\nmodel: odd\nembeddings: true"),
        tmp_path,
    )
    footprint = estimate(config, tmp_path)
    assert footprint.source == "estimate"
    assert footprint.parts["weights"] == (folder / "model.safetensors").stat().st_size


def test_a_gguf_nesting_arrays_without_end_is_refused(tmp_path: Path) -> None:
    import struct

    deep = tmp_path / "deep.gguf"
    key = b"general.x"
    value = b"".join(struct.pack("<IQ", 9, 1) for _ in range(3000))  # arrays of arrays of ...
    deep.write_bytes(
        b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", len(key)) + key
        + struct.pack("<I", 9) + value + b"\0" * 64
    )  # fmt: skip
    with pytest.raises(ModelFileError, match="too deep"):
        read_gguf(deep)
