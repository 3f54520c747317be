"""`hearth tune NAME`: real measurements on the model's real backend, the tables and the JSON
they leave, `--write` editing only the tuned keys of the YAML, and clear refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from gateway.config import load_model_file
from gateway.tune.measure import Figure
from gateway.tune.report import record_path
from gateway.tune.tuner import Row, pick
from gateway.tune.write import WriteError, write_settings
from tests.conftest import hearth, link_tree

pytestmark = pytest.mark.llama

TUNED = ("threads", "batch_size", "parallel", "context_size")
#: A user's file: comments, a nested `threads` that is not the model's, a key tune rewrites
#: with the user's own note on it, and keys after it.
TINY_YAML = """\
# my tiny test model
name: tiny
backend: llama
model: tiny-llama.gguf

context_size: 256   # small on purpose
parameters:
  temperature: 0.3   # keep it calm
  max_tokens: 64
options:
  threads: 7
keep_alive: 10m
"""


@pytest.fixture(scope="module")
def tune_dir(tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path) -> Path:
    directory = tmp_path_factory.mktemp("tune-models")
    shutil.copy(tiny_gguf, directory / "tiny-llama.gguf")
    (directory / "tiny.yaml").write_text(TINY_YAML)
    (directory / "echo.yaml").write_text("name: echo\nbackend: echo\n")
    (directory / "voice.yaml").write_text("name: voice\nbackend: whisper\nmodel: whisper-base\n")
    (directory / "embed.yaml").write_text(
        "name: embed\nbackend: llama\nmodel: tiny-llama.gguf\nembeddings: true\n"
    )
    (directory / "tiny-variant.yaml").write_text("name: tiny-variant\nbase: tiny\n")
    return directory


@pytest.fixture(scope="module")
def written(tune_dir: Path) -> tuple[str, dict[str, object]]:
    """One tune of the tiny model with --write: what it printed, and the JSON it kept."""
    result = hearth("tune", "tiny", "--models-dir", str(tune_dir), "--quick", "--write")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return result.stdout, json.loads(record_path(tune_dir, "tiny").read_text())


def test_every_candidate_is_measured_with_plausible_figures(
    written: tuple[str, dict[str, object]],
) -> None:
    _, record = written
    dimensions = {d["key"]: d for d in record["dimensions"]}  # type: ignore[union-attr,index]
    assert list(dimensions) == list(TUNED)
    for key in ("threads", "batch_size", "parallel"):
        for candidate in dimensions[key]["candidates"]:
            if key == "threads" and candidate["value"] > 1 and not candidate["measured"]:
                # Threads waiting on cores other work holds crawl, and are stopped.
                assert candidate["note"].startswith("stopped: a run took over"), candidate
                continue
            assert candidate["measured"], candidate
            for name, figure in candidate["figures"].items():
                if name == "turn":
                    continue  # seconds, derived from the two rates
                # Tokens per second of a 2-block, 64-wide model: more than nothing, and less
                # than a CPU could possibly do.
                assert 0 < figure["min"] <= figure["median"] <= figure["max"] < 5e6, (key, name)
                # --quick: two repeats (of each stream, for the per-stream speeds); a thread
                # count far slower than the best after one is measured no further.
                streams = candidate["value"] if name == "stream" else 1
                assert 1 <= len(figure["values"]) <= 2 * streams, (key, name)
    threads = [c["value"] for c in dimensions["threads"]["candidates"]]
    assert threads[0] == 1
    context = dimensions["context_size"]["candidates"]
    assert [c["value"] for c in context] == [256, 512]  # the YAML's, then the trained context
    for candidate in context:
        resident = candidate["figures"]["resident"]["median"]
        assert 20 * 2**20 < resident < 2 * 2**30  # a Python process with llama.cpp loaded
    for dimension in dimensions.values():
        values = [c["value"] for c in dimension["candidates"]]
        assert dimension["chosen"] in values
        assert dimension["rule"]


def test_the_table_marks_each_choice_and_sums_them_up(
    written: tuple[str, dict[str, object]],
) -> None:
    stdout, record = written
    chosen = record["chosen"]
    assert isinstance(chosen, dict)
    assert set(chosen) == set(TUNED)
    for key, value in chosen.items():
        # The table's chosen row, and the summary line with its measured figure.
        assert any(
            line.split()[:2] == ["*", str(value)]
            for line in stdout.splitlines()
            if line.startswith("*")
        ), key
        summary = next(line for line in stdout.splitlines() if line.startswith(f"  {key}: "))
        assert summary.startswith(f"  {key}: {value} (")
    assert "tok/s" in stdout
    assert "MiB" in stdout


def test_write_sets_only_the_tuned_keys(
    written: tuple[str, dict[str, object]], tune_dir: Path
) -> None:
    stdout, record = written
    chosen = record["chosen"]
    assert isinstance(chosen, dict)
    path = tune_dir / "tiny.yaml"
    text = path.read_text()
    assert f"written to {path}" in stdout
    kept = [line for line in text.splitlines() if "# hearth tune" not in line]
    original = TINY_YAML.splitlines()
    # Every line of the user's but the rewritten context_size is there, in order; its note
    # moved to a line of its own.
    assert kept == [
        "# small on purpose" if line.startswith("context_size") else line for line in original
    ]
    for key, value in chosen.items():
        assert f"{key}: {value}  # hearth tune {record['date']}: " in text
    config = load_model_file(path, tune_dir)
    assert {key: getattr(config, key) for key in TUNED} == chosen
    assert config.options == {"threads": 7}
    assert config.parameters.temperature == 0.3
    assert config.keep_alive == "10m"


def test_json_output_and_no_write_leaves_the_yaml_alone(tune_dir: Path) -> None:
    before = (tune_dir / "embed.yaml").read_text()
    (tune_dir / "plain.yaml").write_text("name: plain\nbackend: llama\nmodel: tiny-llama.gguf\n")
    result = hearth(
        "tune", "plain", "--models-dir", str(tune_dir), "--quick", "--json", "--cpus", "1"
    )
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["model"] == "plain"
    assert document["written"] is None
    assert [c["value"] for c in document["dimensions"][0]["candidates"]] == [1]
    assert document["chosen"]["threads"] == 1
    assert Path(document["saved"]) == record_path(tune_dir, "plain")
    assert (tune_dir / "plain.yaml").read_text() == (
        "name: plain\nbackend: llama\nmodel: tiny-llama.gguf\n"
    )
    assert (tune_dir / "embed.yaml").read_text() == before


def test_a_transformers_model_is_tuned_for_threads_and_parallel(
    tmp_path: Path, tiny_hf: Path
) -> None:
    link_tree(tiny_hf, tmp_path / "tiny-hf")
    (tmp_path / "tiny-hf.yaml").write_text("name: tiny-hf\nbackend: transformers\nmodel: tiny-hf\n")
    result = hearth("tune", "tiny-hf", "--models-dir", str(tmp_path), "--quick", "--json")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    # Its cache grows with use and it has no batch_size: those are not measured.
    assert [d["key"] for d in document["dimensions"]] == ["threads", "parallel"]
    parallel = document["dimensions"][1]
    assert [c["value"] for c in parallel["candidates"]] == [1, 4]
    for candidate in parallel["candidates"]:
        assert candidate["figures"]["total"]["median"] > 0
    assert set(document["chosen"]) == {"threads", "parallel"}


@pytest.mark.parametrize(
    ("name", "extra", "says"),
    [
        ("nothing-here", [], "no model named nothing-here"),
        ("voice", [], "'voice' is served by the whisper backend: tune measures text generation"),
        ("echo", [], "'echo' is served by the echo backend"),
        ("embed", [], "'embed' is an embedding model"),
        ("tiny-variant", [], "'tiny-variant' is a variant of 'tiny' (base: in its YAML)"),
        ("tiny", ["--only", "threads,seed"], "--only: seed: tune measures threads, batch_size"),
    ],
)
def test_what_tune_cannot_measure_is_a_clear_error(
    tune_dir: Path, name: str, extra: list[str], says: str
) -> None:
    result = hearth("tune", name, "--models-dir", str(tune_dir), *extra)
    assert result.returncode == 1
    assert result.stderr.startswith("error: ")
    assert says in result.stderr
    assert "Traceback" not in result.stderr
    if name != "tiny":
        assert not record_path(tune_dir, name).exists()


def test_a_winner_within_the_noise_is_not_claimed() -> None:
    def row(value: int, *rates: float) -> Row:
        return Row(value, {"rate": Figure(list(rates))})

    close = [row(1, 100, 101, 99), row(2, 103, 104, 102)]  # 3 % apart: the simpler value
    chosen, best = pick(close, "rate", preference=[1, 2])  # type: ignore[misc]
    assert (chosen.value, best.value) == (1, 2)
    clear = [row(1, 60, 61, 59), row(2, 103, 104, 102)]
    chosen, best = pick(clear, "rate", preference=[1, 2])  # type: ignore[misc]
    assert (chosen.value, best.value) == (2, 2)
    overlapping = [row(1, 80, 95, 70), row(2, 100, 110, 90)]  # 16 % apart, spreads overlap
    chosen, _ = pick(overlapping, "rate", preference=[1, 2])  # type: ignore[misc]
    assert chosen.value == 1


def test_write_refuses_a_file_it_cannot_edit_safely(tmp_path: Path, tiny_gguf: Path) -> None:
    shutil.copy(tiny_gguf, tmp_path / "tiny-llama.gguf")
    path = tmp_path / "flow.yaml"
    flow = "{name: flow, backend: llama, model: tiny-llama.gguf, threads: 4}\n"
    path.write_text(flow)
    with pytest.raises(WriteError, match="add these lines to it yourself"):
        write_settings(path, tmp_path, {"threads": 2}, {"threads": "test"})
    assert path.read_text() == flow
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_write_replaces_a_value_written_on_the_next_line(tmp_path: Path) -> None:
    path = tmp_path / "m.yaml"
    path.write_text("name: m\nbackend: llama\nmodel: m.gguf\nthreads:\n  4\n# end\n")
    changes = write_settings(path, tmp_path, {"threads": 2, "parallel": 1}, {})
    assert [(c.key, c.old, c.new) for c in changes] == [("threads", 4, 2), ("parallel", None, 1)]
    assert path.read_text() == (
        "name: m\nbackend: llama\nmodel: m.gguf\nthreads: 2  # hearth tune\n# end\n"
        "parallel: 1  # hearth tune\n"
    )
    # Tuning again replaces its own notes; it does not pile them up.
    write_settings(path, tmp_path, {"threads": 3}, {"threads": "2026-01-02: 50 tok/s"})
    assert path.read_text() == (
        "name: m\nbackend: llama\nmodel: m.gguf\n"
        "threads: 3  # hearth tune 2026-01-02: 50 tok/s\n# end\nparallel: 1  # hearth tune\n"
    )


@pytest.mark.real_model
def test_tuning_the_default_chat_model(
    real_models: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    directory = tmp_path_factory.mktemp("tune-real")
    name = "smollm2-135m-instruct"
    link_tree(real_models / name, directory / name)
    shutil.copy(real_models / f"{name}.yaml", directory / f"{name}.yaml")
    # Threads and context only: the whole of --quick takes a minute or more on busy cores.
    only = "threads,context_size"
    result = hearth(
        "tune", name, "--models-dir", str(directory), "--quick", "--json", "--only", only
    )
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert [d["key"] for d in document["dimensions"]] == ["threads", "context_size"]
    threads = document["dimensions"][0]
    assert threads["chosen"] in [c["value"] for c in threads["candidates"]]
    chosen = next(c for c in threads["candidates"] if c["value"] == threads["chosen"])
    assert chosen["figures"]["generation"]["median"] > 1  # tok/s
    # The trained context, read from the GGUF header, bounds the context candidates.
    contexts = [c["value"] for c in document["dimensions"][1]["candidates"]]
    assert max(contexts) == document["method"]["trained_context"] == 8192
