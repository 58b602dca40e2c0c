"""The documentation works: every relative link of README.md and docs/*.md resolves (files and heading anchors), the
README's Python example runs as written, its command lines use options the commands have, and the demo prints
numbers computed by its own run."""

import contextlib
import io
import math
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def without_code(text: str) -> str:
    """The text outside fenced code blocks and inline code (links there are examples, not links)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def heading_anchors(path: Path) -> set[str]:
    """The anchors GitHub gives the headings of a markdown file (lower case, punctuation dropped, spaces to dashes,
    repeats numbered)."""
    anchors, seen = set(), {}
    for line in re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M).splitlines():
        match = re.match(r"^#{1,6} (.+)$", line)
        if not match:
            continue
        slug = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def broken_links(page: Path) -> list[str]:
    broken = []
    for target in LINK.findall(without_code(page.read_text())):
        if re.match(r"^[a-z]+:", target):  # http:, https:, mailto: are not checked here (no network)
            continue
        file_part, _, anchor = target.partition("#")
        linked = (page.parent / file_part).resolve() if file_part else page
        if not linked.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and linked.suffix == ".md" and anchor not in heading_anchors(linked):
            broken.append(f"{target} (no heading with that anchor)")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    assert broken_links(page) == []


def test_the_link_check_finds_a_broken_link(tmp_path):
    (tmp_path / "there.md").write_text("# A heading\n")
    page = tmp_path / "page.md"
    page.write_text("[ok](there.md#a-heading) [gone](missing.md) [bad anchor](there.md#nope) `[code](x.md)`\n")
    assert broken_links(page) == ["missing.md (no such file)", "there.md#nope (no heading with that anchor)"]


def test_every_docs_page_is_reachable_from_the_readme_or_the_index():
    linked = set()
    for page in (ROOT / "README.md", ROOT / "docs" / "index.md"):
        for target in LINK.findall(without_code(page.read_text())):
            linked.add((page.parent / target.partition("#")[0]).resolve())
    orphans = [p.name for p in sorted((ROOT / "docs").glob("*.md")) if p.resolve() not in linked]
    assert orphans == []


def readme_block(heading: str, language: str) -> str:
    """The first fenced `language` block under the README heading that starts with `heading`."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## " + heading, 1)[1].split("\n## ", 1)[0]
    return re.search(rf"^```{language}\n(.*?)^```", section, flags=re.S | re.M).group(1)


def test_the_readme_python_example_runs_as_written(tmp_path, monkeypatch):
    code = readme_block("Python", "python")
    monkeypatch.chdir(tmp_path)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "README.md", "exec"), {"__name__": "readme_example"})
    lines = printed.getvalue().splitlines()
    assert len(lines) == 2, lines
    generated = lines[0].split(" (")[0]
    assert generated and generated == lines[1]  # generate() by hand and cm.answer agree
    kept, total = map(int, re.search(r"\((\d+) of (\d+) prompt tokens", lines[0]).groups())
    assert kept < total


def command_help(subcommand: str, capsys) -> str:
    from corematching.apps import cli

    with pytest.raises(SystemExit) as leaving:
        cli.main([subcommand, "--help"] if subcommand else ["--help"])
    assert leaving.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: corematching {subcommand}".rstrip()), out.splitlines()[0]  # that command's help
    return out


def command_lines(text: str) -> list[list[str]]:
    """The `corematching ...` command lines of the bash blocks of a page, continuation lines joined, comments cut."""
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line.startswith("corematching"):
                commands.append(shlex.split(line))
    return commands


def test_the_command_lines_of_the_docs_use_options_the_commands_have(capsys):
    commands = [words for page in PAGES for words in command_lines(page.read_text())]
    assert len(commands) >= 15
    helps = {}
    for words in commands:
        sub = words[1] if len(words) > 1 and words[1] in ("demo", "eval", "bench", "serve", "plan") else ""
        if sub not in helps:
            helps[sub] = command_help(sub, capsys)
        options = [word.split("=")[0] for word in words if word.startswith("--")]
        missing = [option for option in options if option not in helps[sub]]
        assert missing == [], f"{' '.join(words)}: the command does not have {missing}"


def test_the_scripts_and_modules_the_docs_name_exist():
    import importlib.util

    missing = []
    for page in PAGES:
        for module in re.findall(r"python -m (corematching[\w.]*)", page.read_text()):
            if importlib.util.find_spec(module) is None:
                missing.append(f"{page.name}: python -m {module}")
        for script in re.findall(r"python ((?:studies|benchmarks)/[\w/]+\.py)", page.read_text()):
            if not (ROOT / script).is_file():
                missing.append(f"{page.name}: python {script}")
    assert missing == []


DOTTED = re.compile(r"""(?<![\w"'])corematching(?:\.\w+)+""")  # a module path (not a quoted request field)


def unresolved_dotted_names(text: str) -> list[str]:
    """The `corematching.a.b.c` names of a text that are neither a module nor an attribute of one."""
    import importlib

    missing = []
    for name in sorted(set(DOTTED.findall(text))):
        parts = name.split(".")
        for cut in range(len(parts), 0, -1):  # the longest prefix that is a module, then attributes
            try:
                value = importlib.import_module(".".join(parts[:cut]))
            except ModuleNotFoundError:
                continue
            try:
                for attribute in parts[cut:]:
                    value = getattr(value, attribute)
            except AttributeError:
                missing.append(name)
            break
        else:
            missing.append(name)
    return missing


def test_the_module_paths_the_docs_name_exist():
    missing = [f"{page.name}: {name}" for page in PAGES for name in unresolved_dotted_names(page.read_text())]
    assert missing == []
    assert unresolved_dotted_names("`corematching.gone.worker` and corematching.runtime.nothing_here") == [
        "corematching.gone.worker", "corematching.runtime.nothing_here"]


# ----------------------------------------------------------------------------- the demo


def test_wilson_interval_known_values():
    from corematching.stats import wilson_interval

    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert wilson_interval(402, 700) == pytest.approx((0.5373, 0.6104), abs=1e-4)
    with pytest.raises(ValueError, match="at least one answer"):
        wilson_interval(0, 0)


def test_paired_difference():
    from corematching.stats import paired_difference

    mean, low, high = paired_difference([True, True, True, False], [False, True, False, False])
    assert mean == pytest.approx(0.5)
    assert low < 0.5 < high and high - 0.5 == pytest.approx(0.5 - low)
    with pytest.raises(ValueError, match="same non-zero length"):
        paired_difference([True], [True, False])


def test_the_demo_prints_what_its_run_measured(tmp_path, capsys):
    from corematching.apps import demo
    from corematching.stats import wilson_interval

    args = demo.parse_args(["--questions", "4", "--models", "scenes-smollm2", "--timing-prompts", "1",
                            "--timing-reps", "1", "--out", str(tmp_path / "pictures")])
    results, items = demo.run_model("scenes-smollm2", args, tmp_path / "answers")
    assert [r.label for r in results] == ["dense", "CoreMatching", "random tokens"]
    for result in results:
        right = sum(result.correct)
        assert len(result.answers) == len(items) == 4
        assert [row["index"] for row in result.answers] == [0, 1, 2, 3]
        assert result.accuracy == right / 4
        assert result.interval == wilson_interval(right, 4)
        assert math.isfinite(result.prefill_s) and result.prefill_s > 0
    assert results[1].mean_kept == results[2].mean_kept == 8  # 12.5% of 64, the same budget for both
    table = demo.report_table("scenes-smollm2", results, 64, 4, "scenes")
    assert f"{100 * results[1].accuracy:.1f}%" in table.splitlines()[3]
    pictures = demo.save_pictures(results, items, (8, 8), 2, tmp_path / "pictures")
    assert [p.name for p in pictures] == ["00.png", "01.png"] and all(p.exists() for p in pictures)


def test_python_m_corematching_is_the_demo_without_arguments_or_after_the_word_demo():
    from corematching.apps.demo import wants_demo

    assert wants_demo([]) and wants_demo(["demo", "--questions", "20"])
    assert not wants_demo(["--image", "x.png", "--question", "q"]) and not wants_demo(["eval", "--output", "a"])


def test_the_demo_refuses_bad_settings(capsys):
    from corematching.apps import demo

    for argv, problem in ((["--questions", "1"], "--questions"), (["--budget", "1.5"], "--budget"),
                          (["--models", "llava"], "--models takes")):
        with pytest.raises(SystemExit):
            demo.parse_args(argv)
        assert problem in capsys.readouterr().err
