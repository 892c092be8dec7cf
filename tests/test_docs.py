"""The README against the code: the generated metric tables, every family, every collector key, which
collectors are polled and the permissions they need, and that its examples parse."""

from __future__ import annotations

import difflib
import re
import shutil
import subprocess
from pathlib import Path
from typing import Final

import pytest
import yaml

from exporter import config as config_module
from exporter.catalogue import CATALOGUE, COLLECTORS, all_families
from exporter.config import COLLECTOR_NAMES, parse_config
from exporter.docs import BEGIN, END, tables
from exporter.selfmetrics import SELF

ROOT: Final = Path(__file__).resolve().parent.parent
README: Final = ROOT / "README.md"
EXAMPLE: Final = ROOT / "config.example.yaml"
REGENERATE: Final = "python -m exporter.docs --write README.md"


def readme() -> str:
    return README.read_text(encoding="utf-8")


def section(title: str) -> str:
    """The README's `## title` section, up to the next `## ` heading."""
    text = readme()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start: end if end != -1 else len(text)]


def table_rows(text: str, header: str) -> list[list[str]]:
    """The cells of each row of the Markdown table whose header line starts with `header`."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split(" | ")])
    return rows


def yaml_blocks(text: str) -> list[str]:
    return re.findall(r"```yaml\n(.*?)```", text, flags=re.DOTALL)


# --- the generated tables -----------------------------------------------------------------------


def test_readme_metric_tables_are_the_generated_ones() -> None:
    text = readme()
    assert text.count(BEGIN) == 1 and text.count(END) == 1, (
        f"README.md must hold the metric tables between the markers of exporter/docs.py once; "
        f"put them back and run `{REGENERATE}`")
    block = text[text.index(BEGIN): text.index(END) + len(END)]
    expected = tables()
    diff = "\n".join(difflib.unified_diff(block.splitlines(), expected.splitlines(), "README.md", "generated",
                                          lineterm="", n=0))
    assert block == expected, (f"README.md's metric tables differ from the declarations; regenerate them with "
                               f"`{REGENERATE}`:\n{diff}")


@pytest.mark.parametrize("name", [f.name for f in all_families()] + list(SELF))
def test_every_family_is_in_the_readme(name: str) -> None:
    assert f"`{name}`" in readme(), f"{name} is not in README.md; run `{REGENERATE}`"


# --- collectors -----------------------------------------------------------------------------------

COLLECTOR_KEYS: Final = sorted({*COLLECTOR_NAMES,
                                *(key for keys in config_module._COLLECTOR_KEYS.values() for key in keys)})


@pytest.mark.parametrize("key", COLLECTOR_KEYS)
def test_every_collectors_key_is_in_the_readme_and_the_example(key: str) -> None:
    assert f"`{key}`" in section("Collectors"), f"collectors key {key} is not in README.md's Collectors section"
    example = EXAMPLE.read_text(encoding="utf-8")
    block = example[example.index("\ncollectors:\n"):]
    block = block[: block.find("\n\n")]  # up to the next section of the example
    # Documented as a key, commented out or not (enabled on a v3-only collector is commented out).
    assert re.search(rf"(?<![\w]){key}\s*:", block), f"collectors key {key} is not in {EXAMPLE.name}'s collectors"


def test_readme_says_which_collectors_this_release_polls() -> None:
    rows = {row[0].strip("`"): row[-1] for row in table_rows(section("Collectors"), "| collector | scope |")}
    assert sorted(rows) == sorted(COLLECTOR_NAMES)
    wrong = {name: said for name, said in rows.items() if said != ("yes" if name in COLLECTORS else "not yet")}
    assert not wrong, (f"README.md's Collectors table says {wrong}, but the catalogue declares "
                       f"{sorted(COLLECTORS)}: say `yes` for those and `not yet` for the others")


def test_readme_names_the_permission_each_collector_needs() -> None:
    table = table_rows(section("Setting up API v3"), "| collector | v3 endpoints |")
    rows = {row[0].strip("`"): row for row in table}
    assert sorted(rows) == sorted(COLLECTOR_NAMES)
    for collector in CATALOGUE:
        # The permission a 403 names in the log (from the declaration) is the one the README names.
        for permission in re.findall(r"\b(?:View|Manage)[A-Za-z]+", collector.permission):
            assert f"`{permission}`" in rows[collector.name][-1], (collector.name, permission)
        paths = {e.path.split("{")[0] for call in collector.calls.get("v3", ()) for e in call}
        cell = rows[collector.name][1]
        for path in paths:
            tail = path.removeprefix("/v3/enterprise")
            # A per-organization path is written with its `{id}`: its part before the id must be there.
            assert path in cell or f"`{tail}" in cell, f"{collector.name}: {path} is not in the permissions table"


def test_readme_config_snippets_are_valid_on_v3() -> None:
    """The collectors and discovery examples, with a key and an org set, are a config the exporter takes."""
    for title in ("Collectors", "Organization discovery"):
        (snippet,) = yaml_blocks(section(title))
        document = {"api": {"api_key": "cog_docs_example"}, "org_sets": [{"name": "enterprise"}],
                    **yaml.safe_load(snippet)}
        config = parse_config(yaml.safe_dump(document), f"README {title}", env={})
        assert config.api.version == "v3"


def test_check_config_note_in_the_readme_is_what_the_exporter_says() -> None:
    config = parse_config("api: {api_key: cog_docs_example}\norg_sets:\n"
                          "  - {name: mobile-oncall, org_ids: [org-789], user_ids: [user-1]}\n", env={})
    from exporter.plan import build_plan

    notes = [f"note: {n}" for n in build_plan(config).notes]
    assert notes and notes[0] in section("Collectors"), notes


# --- examples parse -------------------------------------------------------------------------------


def readme_queries() -> list[str]:
    examples = table_rows(section("Metrics"), "| query | what it shows |")
    return [row[0].strip("`") for row in examples] + [f.example for f in SELF.values() if f.example]


def test_readme_example_queries_parse(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package prometheus; scripts/test installs it)")
    queries = readme_queries()
    assert len(queries) > len(SELF)
    rules = {"groups": [{"name": "readme", "rules": [{"record": f"readme:query_{i}:example", "expr": q}
                                                      for i, q in enumerate(queries)]}]}
    path = tmp_path / "readme-queries.yaml"
    path.write_text(yaml.safe_dump(rules), encoding="utf-8")
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
