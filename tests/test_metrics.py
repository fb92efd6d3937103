"""--metrics-file: the Prometheus textfile-collector file every upload, resume and gc leaves.

Parsed with prometheus_client's own text parser, as node_exporter's format is read."""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from archup.cli import app

SAMPLE_NAMES = {"archup_last_run_exit_code", "archup_last_run_outcome", "archup_last_run_timestamp_seconds",
                "archup_last_run_duration_seconds", "archup_last_run_files", "archup_last_run_bytes",
                "archup_last_success_timestamp_seconds"}


def parse(path: Path) -> dict[str, list[Any]]:
    """Metric name -> its samples; every family must carry a HELP and a gauge TYPE."""
    text = path.read_text(encoding="utf-8")
    families = {}
    for family in text_string_to_metric_families(text):
        assert family.documentation, f"{family.name} has no HELP line"
        assert family.type == "gauge", family
        assert f"# TYPE {family.name} gauge" in text
        families[family.name] = family.samples
    return families


def value(families: dict[str, list[Any]], name: str, **labels: str) -> float:
    [sample] = [s for s in families[name] if all(s.labels.get(k) == v for k, v in labels.items())]
    return float(sample.value)


def make_source(root: Path) -> dict[str, bytes]:
    files = {"a.txt": b"alpha\n" * 100, "dir/b.bin": os.urandom(3000), "dir/c.txt": b"gamma\n"}
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    os.symlink("a.txt", root / "link")  # skipped by policy (symlinks are not followed by default)
    return files


def test_a_successful_upload_writes_every_metric_with_the_jobs_labels(cli, bucket: str, tmp_path: Path) -> None:
    source = tmp_path / "src"
    files = make_source(source)
    metrics_file = tmp_path / "textfile" / "archup.prom"
    metrics_file.parent.mkdir()
    before = time.time()

    result = cli("upload", "--json", "--metrics-file", str(metrics_file), str(source))

    assert result.exit_code == 0, result.stderr
    families = parse(metrics_file)
    assert SAMPLE_NAMES <= set(families)
    labels = {"command": "upload", "bucket": bucket, "prefix": "staging/", "source": str(source.resolve())}
    for samples in families.values():
        for sample in samples:
            assert {k: sample.labels[k] for k in labels} == labels, sample
    assert value(families, "archup_last_run_exit_code") == 0
    assert value(families, "archup_last_run_outcome", outcome="finalized") == 1
    assert value(families, "archup_last_run_files", state="uploaded") == len(files)
    assert value(families, "archup_last_run_bytes", state="uploaded") == sum(map(len, files.values()))
    assert value(families, "archup_last_run_files", state="skipped") == 1
    assert value(families, "archup_last_run_files", state="failed") == 0
    assert value(families, "archup_last_run_duration_seconds") > 0
    assert before <= value(families, "archup_last_success_timestamp_seconds") <= time.time()
    assert stat.S_IMODE(metrics_file.stat().st_mode) == 0o644
    assert sorted(p.name for p in metrics_file.parent.iterdir()) == ["archup.prom"]  # no temp file left


def test_a_failed_run_reports_its_exit_code_and_keeps_the_last_success(cli, bucket: str, tmp_path: Path) -> None:
    source = tmp_path / "src"
    make_source(source)
    metrics_file = tmp_path / "archup.prom"
    assert cli("upload", "--metrics-file", str(metrics_file), str(source)).exit_code == 0
    succeeded_at = value(parse(metrics_file), "archup_last_success_timestamp_seconds")

    # The same job, its bucket gone: a destination error (exit 5).
    failed = cli("upload", "--bucket", f"{bucket}-gone", "--metrics-file", str(metrics_file), str(source))

    assert failed.exit_code == 5, failed.stderr
    families = parse(metrics_file)
    assert value(families, "archup_last_run_exit_code") == 5
    assert value(families, "archup_last_run_outcome", outcome="error") == 1
    assert value(families, "archup_last_success_timestamp_seconds") == succeeded_at
    assert value(families, "archup_last_run_timestamp_seconds") >= succeeded_at


def test_a_usage_error_is_reported_too(cli, tmp_path: Path) -> None:
    metrics_file = tmp_path / "archup.prom"
    result = cli("upload", "--metrics-file", str(metrics_file), str(tmp_path / "no-such-dir"))
    assert result.exit_code == 2
    families = parse(metrics_file)
    assert value(families, "archup_last_run_exit_code") == 2
    assert "archup_last_success_timestamp_seconds" not in families  # it never succeeded


def test_resume_and_gc_write_their_own_files(cli, tmp_path: Path) -> None:
    source = tmp_path / "src"
    make_source(source)
    uploaded = cli("upload", "--no-finalize", "--json", str(source))
    assert uploaded.exit_code == 0, uploaded.stderr
    batch_id = json.loads(uploaded.stdout)["batch_id"]

    resumed_file, gc_file = tmp_path / "resume.prom", tmp_path / "gc.prom"
    resumed = cli("resume", batch_id, "--endpoint-url", cli.endpoint, "--metrics-file", str(resumed_file))
    assert resumed.exit_code == 0, resumed.stderr
    families = parse(resumed_file)
    assert value(families, "archup_last_run_outcome", outcome="finalized") == 1
    assert value(families, "archup_last_run_files", state="uploaded") == 3
    [sample] = families["archup_last_run_exit_code"]
    assert sample.labels["command"] == "resume" and sample.labels["bucket"] == cli.bucket
    assert sample.labels["source"] == str(source.resolve())

    collected = cli("gc", "--metrics-file", str(gc_file))
    assert collected.exit_code == 0, collected.stderr
    families = parse(gc_file)
    assert value(families, "archup_last_run_exit_code") == 0
    assert value(families, "archup_gc_batches_expired") == 0
    assert value(families, "archup_gc_batches_forgotten") == 0  # a batch of today, under the default 30d
    forgot = cli("gc", "--forget-after", "0s", "--metrics-file", str(gc_file))
    assert forgot.exit_code == 0, forgot.stderr
    families = parse(gc_file)
    assert value(families, "archup_gc_batches_forgotten") == 1
    assert value(families, "archup_journal_bytes") == cli.journal.stat().st_size
    assert "archup_last_success_timestamp_seconds" in families


def test_the_config_file_can_name_it(cli, tmp_path: Path) -> None:
    source = tmp_path / "src"
    make_source(source)
    metrics_file = tmp_path / "from-config.prom"
    config = tmp_path / "config.toml"
    config.write_text(f'metrics_file = "{metrics_file}"\n', encoding="utf-8")
    result = CliRunner().invoke(app, ["--config", str(config), "upload", *cli.common("upload"), str(source)])
    assert result.exit_code == 0, result.stderr
    assert value(parse(metrics_file), "archup_last_run_exit_code") == 0


def test_a_dry_run_writes_nothing(cli, tmp_path: Path) -> None:
    source = tmp_path / "src"
    make_source(source)
    metrics_file = tmp_path / "archup.prom"
    assert cli("upload", "--dry-run", "--metrics-file", str(metrics_file), str(source)).exit_code == 0
    assert not metrics_file.exists()


def test_an_unwritable_metrics_file_is_a_warning_not_a_failed_archive(cli, s3, bucket: str, tmp_path: Path) -> None:
    source = tmp_path / "src"
    files = make_source(source)
    result = cli("upload", "--json", "--metrics-file", str(tmp_path / "missing-dir" / "archup.prom"), str(source))
    assert result.exit_code == 0, result.stderr
    assert "warning: cannot write metrics file" in result.stderr
    assert json.loads(result.stdout)["files_uploaded"] == len(files)
