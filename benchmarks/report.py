"""Write benchmark results into BENCHMARKS.md, one section per benchmark script.

Each script owns one section (delimited by HTML comments) and replaces it on every run, so the
file always holds the latest figures of every benchmark together with how they were produced.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import shlex
import sys
from importlib import metadata
from pathlib import Path

REPORT = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"
# The real data sets (never inside the repo); SASREC_SHARED_DATA points elsewhere, e.g. on the GPU machine.
SHARED_DATA = Path(os.environ.get("SASREC_SHARED_DATA") or REPORT.parent.parent / "shared" / "data")
HEADER = (
    "# Benchmarks\n\n"
    "Written by the scripts in `benchmarks/` (`make bench` runs them all). Each section says the command,\n"
    "date, machine and library versions it was measured with. Timings on shared 2-core machines are noisy:\n"
    "compare ratios measured in the same run.\n"
)


def machine() -> str:
    """CPUs (model and widest vector extension: hosts named alike differ, e.g. AMD EPYC with or without
    AVX-512, and XLA's speed with them), memory and kernel."""
    model, flags = "", []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not model:
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = line.split(":", 1)[1].split()
    except OSError:
        pass
    vector = next((name for flag, name in (("avx512f", "AVX-512"), ("avx2", "AVX2")) if flag in flags), "")
    cpu = ", ".join(filter(None, [model or platform.processor() or platform.machine(), vector]))
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kb / 2**20:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    return f"{os.cpu_count()} CPUs ({cpu}){mem}, {platform.system()} {platform.release()}"


def accelerator() -> str:
    """The GPU(s) ``nvidia-smi`` lists, else ``CPU``."""
    import shutil
    import subprocess

    if shutil.which("nvidia-smi"):
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout
        gpus = [line.split(":", 1)[1].split("(")[0].strip() for line in listed.splitlines() if ":" in line]
        if gpus:
            return ", ".join(gpus)
    return "CPU"


def versions(*packages: str) -> str:
    names = packages or ("numpy", "pandas", "pyarrow", "keras", "tensorflow", "jax", "grpcio")
    found = []
    for name in names:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return f"Python {platform.python_version()}, " + ", ".join(found)


def markdown_table(rows: list[dict]) -> str:
    if not rows:
        return "(no rows)\n"
    cols = list(rows[0])
    for row in rows[1:]:
        cols += [c for c in row if c not in cols]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c, "")) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def run_command(argv: list[str] | None = None) -> str:
    """The command as anyone runs it from the repository root: ``python -m benchmarks.NAME ARGS``, with
    paths inside the repository written relative to it (no machine's absolute paths)."""
    argv = list(sys.argv if argv is None else argv)
    root = REPORT.parent
    script = Path(argv[0]).resolve()
    head = (f"python -m {'.'.join(script.relative_to(root).with_suffix('').parts)}"
            if script.is_relative_to(root) and script.suffix == ".py" else f"python {argv[0]}")

    def relative(arg: str) -> str:
        return arg.replace(f"{root}/", "").replace(str(root), ".")

    return " ".join([head, *(shlex.quote(relative(a)) for a in argv[1:])])


def section_rows(name: str) -> tuple[list[dict], str]:
    """The table rows (cells as text) of section ``name`` of BENCHMARKS.md and its date line; ([], "")
    when the section is absent. For scripts that rerun some rows and keep the others."""
    text = REPORT.read_text() if REPORT.exists() else ""
    match = re.search(rf"<!-- section:{re.escape(name)} -->(.*?)<!-- /section:{re.escape(name)} -->", text, re.S)
    if not match:
        return [], ""
    date = re.search(r"^- Date: (.*)$", match.group(1), re.M)
    lines = [line for line in match.group(1).splitlines() if line.startswith("|")]
    if len(lines) < 2:
        return [], date.group(1) if date else ""
    cells = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in lines]
    return [dict(zip(cells[0], row)) for row in cells[2:]], date.group(1) if date else ""


def write_section_keeping(name: str, title: str, rows: list[dict], key: str, notes: str = "", measured: bool = False,
                          order=None) -> str:
    """``write_section`` with the section's earlier rows whose ``key`` none of ``rows`` has kept. They are read
    now, when writing, not when the run started: a run of hours must not drop rows that another run wrote
    meanwhile. ``measured``: a kept row without a "measured" cell gets its section's date line there;
    ``order``: a sort key for the merged rows (default: kept rows first)."""
    earlier, date = section_rows(name)
    fresh = {row[key] for row in rows}
    kept = [{**row, "measured": row.get("measured") or date} if measured else row
            for row in earlier if row[key] not in fresh]
    merged = kept + rows
    return write_section(name, title, merged if order is None else sorted(merged, key=order), notes=notes)


def write_section(name: str, title: str, rows: list[dict], notes: str = "", command: str | None = None) -> str:
    """Replace section ``name`` of BENCHMARKS.md with ``rows``; returns the section text."""
    command = command or run_command()
    if name.endswith("-quick"):  # the quick run of a section sits beside the full one: tell them apart
        title += " (quick run)"
    now = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    body = (
        f"<!-- section:{name} -->\n## {title}\n\n"
        f"- Command: `{command}`\n- Date: {now}\n- Machine: {machine()}\n- Versions: {versions()}\n\n"
        f"{markdown_table(rows)}"
        + (f"\n{notes.strip()}\n" if notes.strip() else "")
        + f"<!-- /section:{name} -->\n"
    )
    text = REPORT.read_text() if REPORT.exists() else HEADER
    pattern = re.compile(rf"<!-- section:{re.escape(name)} -->.*?<!-- /section:{re.escape(name)} -->\n", re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: body, text)
    else:
        text = text.rstrip("\n") + "\n\n" + body
    tmp = REPORT.with_suffix(".md.tmp")
    tmp.write_text(text)
    os.replace(tmp, REPORT)
    print(body)
    return body
