"""Sharding: each org set is polled by exactly one of COUNT replicas, chosen by a stable hash of its name."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import parse_samples
from test_cli_config import ROOT, assert_config_error, base_env, run
from test_cli_daemon import (  # noqa: F401 - procs, sim and simulator are fixtures used here
    Proc,
    http,
    procs,
    scrape,
    sim,
    simulator,
    start_daemon,
    write_config,
)

from exporter.config import ConfigError, parse_config
from exporter.shard import Shard, owner, parse_shard

NAMES = [f"org-set-{i}" for i in range(1000)]


def _config_text(org_sets: list[str], shard: str | None = None) -> str:
    text = "api: {api_key: apk_user_x}\norg_sets:\n" + "".join(f"  - name: {n}\n" for n in org_sets)
    return text + (f"shard: {shard}\n" if shard is not None else "")


# --- the assignment -------------------------------------------------------------------------------


@pytest.mark.parametrize("count", range(1, 9))
def test_every_org_set_lands_on_exactly_one_shard(count: int) -> None:
    loads = [0] * count
    for name in NAMES:
        owners = [index for index in range(count) if Shard(index, count).owns(name)]
        assert owners == [owner(name, count)]
        loads[owners[0]] += 1
    # Balanced enough to be worth it: no replica gets less than half or more than 1.5x its share.
    assert all(len(NAMES) / count / 2 < load < len(NAMES) / count * 1.5 for load in loads), loads


@pytest.mark.parametrize("count", range(1, 9))
def test_adding_a_shard_moves_only_the_org_sets_the_new_shard_takes(count: int) -> None:
    moved = [name for name in NAMES if owner(name, count) != owner(name, count + 1)]
    assert all(owner(name, count + 1) == count for name in moved)  # nothing shuffles between old ones
    assert len(moved) <= 2 * len(NAMES) / (count + 1), (len(moved), count)
    assert moved  # the new replica does get work


def test_assignment_is_the_same_in_every_process_whatever_the_hash_seed() -> None:
    script = (
        "import json, sys; from exporter.shard import owner; "
        "print(json.dumps([owner(n, 5) for n in json.load(sys.stdin)]))"
    )
    results = []
    for seed in ("1", "2", "random"):
        env = {**base_env(), "PYTHONHASHSEED": seed}
        done = subprocess.run([sys.executable, "-c", script], input=json.dumps(NAMES[:300]), env=env,
                              capture_output=True, text=True, timeout=60, check=True, cwd=ROOT)
        results.append(json.loads(done.stdout))
    assert results[0] == results[1] == results[2] == [owner(n, 5) for n in NAMES[:300]]


# --- parsing: flag and config -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "hostname", "expected"),
    [("0/1", "", Shard(0, 1)), ("2/3", "", Shard(2, 3)), (" 1 / 4 ", "", Shard(1, 4)),
     ("auto/3", "devin-usage-exporter-2", Shard(2, 3)), ("auto/12", "web-0-10", Shard(10, 12))],
)
def test_parse_shard_accepts_index_or_a_statefulset_ordinal(text: str, hostname: str,
                                                              expected: Shard) -> None:
    assert parse_shard(text, {"HOSTNAME": hostname}) == expected


@pytest.mark.parametrize(
    ("text", "hostname", "message"),
    [("3/3", "", "INDEX must be from 0 to 2"), ("-1/3", "", "is not INDEX/COUNT"),
     ("1/0", "", "COUNT must be"),
     ("1", "", "is not INDEX/COUNT"), ("a/3", "", "is not INDEX/COUNT"),
     ("auto/3", "laptop", "HOSTNAME is 'laptop'"), ("auto/3", "", "HOSTNAME is ''"),
     ("auto/3", "exporter-3", "gives index 3, but there are only 3 shards")],
)
def test_parse_shard_rejects_with_the_reason(text: str, hostname: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        parse_shard(text, {"HOSTNAME": hostname})


def test_config_shard_keeps_only_the_org_sets_this_replica_owns() -> None:
    names = NAMES[:40]
    configs = [parse_config(_config_text(names, f"{i}/3"), "c.yaml", env={}) for i in range(3)]
    owned = [{s.name for s in c.org_sets} for c in configs]
    assert set().union(*owned) == set(names) and sum(map(len, owned)) == len(names)
    assert [s.name for s in configs[1].org_sets] == [n for n in names if owner(n, 3) == 1]  # file order kept
    assert configs[1].summary().startswith(f"c.yaml: OK: shard 1/3: {len(owned[1])} of 40 org set(s),")
    # The flag overrides the file's shard, from the full list.
    assert {s.name for s in configs[1].with_shard(Shard(2, 3)).org_sets} == owned[2]
    unsharded = parse_config(_config_text(names), "c.yaml", env={})
    assert configs[1].with_shard(None).org_sets == unsharded.org_sets


def test_config_auto_shard_reads_hostname_from_the_environment() -> None:
    config = parse_config(_config_text(NAMES[:20], "auto/2"), "c.yaml", env={"HOSTNAME": "exporter-1"})
    assert config.shard == Shard(1, 2)
    assert {s.name for s in config.org_sets} == {n for n in NAMES[:20] if owner(n, 2) == 1}


@pytest.mark.parametrize("value", ["", "null"])
def test_config_shard_empty_or_null_means_no_sharding(value: str) -> None:
    config = parse_config(_config_text(NAMES[:5], repr(value) if value == "" else value), "c.yaml", env={})
    assert config.shard is None and len(config.org_sets) == 5


@pytest.mark.parametrize(
    ("value", "message"),
    [("3", "c.yaml: shard: must be INDEX/COUNT or auto/COUNT as a string"),
     ("5/3", "c.yaml: shard: '5/3': INDEX must be from 0 to 2"),
     ("auto/3", "c.yaml: shard: 'auto/3': auto takes the index from $HOSTNAME"),
     ("{index: 0, count: 2}", "c.yaml: shard: must be INDEX/COUNT or auto/COUNT as a string")],
)
def test_config_shard_errors_name_the_key(value: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(_config_text(NAMES[:3], value), "c.yaml", env={"HOSTNAME": "laptop"})
    assert str(info.value).startswith(message), str(info.value)


def test_cli_shard_flag_errors_exit_2_naming_the_flag(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(_config_text(NAMES[:3]))
    result = run("--config", str(config), "--check-config", "--shard", "3/2")
    assert result.returncode == 2 and result.stdout == ""
    assert "argument --shard: '3/2': INDEX must be from 0 to 1" in result.stderr
    result = run("--config", str(config), "--check-config", "--shard", "auto/2", env=base_env(HOSTNAME="box"))
    assert result.returncode == 2 and "argument --shard: 'auto/2': auto takes the index" in result.stderr


def test_cli_config_shard_error_exits_2_naming_file_and_key(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(_config_text(NAMES[:3], "2/2"))
    assert_config_error(run("--config", str(config), "--check-config"), f"{config}: shard: '2/2'")


def test_cli_check_config_reports_the_shard_and_the_flag_overrides_the_file(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(_config_text(NAMES[:30], "0/2"))
    mine = sum(owner(n, 3) == 2 for n in NAMES[:30])
    result = run("--config", str(config), "--check-config", "--shard", "auto/3", env=base_env(HOSTNAME="x-2"))
    assert result.returncode == 0, result.stderr
    assert f": OK: shard 2/3: {mine} of 30 org set(s), {4 * mine} schedule(s)" in result.stdout


# --- running sharded --------------------------------------------------------------------------


def test_replicas_split_the_org_sets_between_them_with_no_overlap(
    sim: str, tmp_path: Path, procs: Callable[..., Proc]  # noqa: F811
) -> None:
    names = NAMES[:12]
    config = write_config(tmp_path / "c.yaml", sim, "".join(f"  - name: {n}\n" for n in names))
    seen: list[set[str]] = []
    for index in range(2):
        _, url = start_daemon(procs, config, "--shard", f"{index}/2", "--listen", "127.0.0.1:0")
        samples = parse_samples(scrape(url))
        seen.append({dict(lbls)["org"] for lbls in samples["devin_up"]})
    assert seen == [{n for n in names if owner(n, 2) == i} for i in range(2)]


def test_a_replica_that_owns_no_org_set_runs_warns_and_serves_health_metrics(
    sim: str, tmp_path: Path, procs: Callable[..., Proc]  # noqa: F811
) -> None:
    name = "lonely"
    config = write_config(tmp_path / "c.yaml", sim, f"  - name: {name}\n")
    idle = 1 - owner(name, 2)
    proc, url = start_daemon(procs, config, "--shard", f"{idle}/2")
    assert any("this shard owns none of the org sets" in line and f"shard={idle}/2" in line
               for line in proc.stderr_lines())
    samples = parse_samples(scrape(url))
    assert "devin_up" not in samples and samples["devin_exporter_build_info"]
    assert http("GET", url + "healthz")[0] == 200 and http("GET", url + "readyz")[0] == 200



# --- the request budget ---------------------------------------------------------------------------


def test_each_shard_takes_its_share_of_the_keys_request_rate_however_the_shard_is_given() -> None:
    text = "api: {api_key: apk_user_x, max_requests_per_second: 6}\norg_sets:\n  - name: a\n"
    alone = parse_config(text, "c.yaml", env={})
    assert alone.api.requests_per_second == 6
    in_file = parse_config(text + "shard: 0/3\n", "c.yaml", env={})
    assert in_file.api.requests_per_second == 2
    # --shard over a file's `shard` (the CLI applies it again): the share is of the key's rate, once.
    assert in_file.with_shard(Shard(1, 4)).api.requests_per_second == 1.5
    assert in_file.with_shard(None).api.requests_per_second == 6
    # Discovered org sets keep the share, and the configured value stays what the file says.
    grown = in_file.with_org_sets(())
    assert (grown.api.requests_per_second, grown.api.max_requests_per_second) == (2, 6)
