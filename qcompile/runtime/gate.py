"""``qcompile gate``: hold an artifact to latency, accuracy and size budgets in CI.

Each budget becomes a :class:`Check` with the measured (or predicted) value, where the value came from,
and whether it holds. :func:`table` prints them for people, :func:`write_junit` writes JUnit XML (one
test case per check, a ``<failure>`` for each broken budget) for CI systems.
"""

from __future__ import annotations

import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Check:
    """One budget: ``value <= budget`` (in ``unit``) holds or not; ``source`` says how ``value`` was obtained."""

    name: str
    budget: float
    value: float
    unit: str
    source: str

    @property
    def passed(self) -> bool:
        return self.value <= self.budget

    def message(self) -> str:
        verdict = "within" if self.passed else "over"
        return f"{self.name} {self.value:.4g} {self.unit} is {verdict} the budget {self.budget:.4g} {self.unit}"


def table(checks: list[Check]) -> str:
    rows = [("check", "budget", "value", "result", "source")]
    for check in checks:
        rows.append(
            (
                check.name,
                f"{check.budget:.4g} {check.unit}",
                f"{check.value:.4g} {check.unit}",
                "PASS" if check.passed else "FAIL",
                check.source,
            )
        )
    widths = [max(len(row[column]) for row in rows) for column in range(4)]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row[:4], widths, strict=True)) + "  " + row[4]
        for row in rows
    ]
    return "\n".join(lines)


def write_junit(checks: list[Check], path: Path, artifact: str) -> None:
    """JUnit XML: a ``testsuite`` named after the artifact with one ``testcase`` per check."""
    failures = sum(not check.passed for check in checks)
    suite = ElementTree.Element(
        "testsuite", name=f"qcompile gate {artifact}", tests=str(len(checks)), failures=str(failures), errors="0"
    )
    for check in checks:
        case = ElementTree.SubElement(suite, "testcase", classname="qcompile.gate", name=check.name, time="0")
        properties = ElementTree.SubElement(case, "properties")
        for key, value in (
            ("budget", f"{check.budget}"),
            ("value", f"{check.value}"),
            ("unit", check.unit),
            ("source", check.source),
        ):
            ElementTree.SubElement(properties, "property", name=key, value=value)
        if not check.passed:
            ElementTree.SubElement(case, "failure", message=check.message(), type="BudgetExceeded").text = check.source
        else:
            ElementTree.SubElement(case, "system-out").text = check.message()
    root = ElementTree.Element("testsuites")
    root.append(suite)
    tree = ElementTree.ElementTree(root)
    ElementTree.indent(tree)
    path.parent.mkdir(parents=True, exist_ok=True)
    tree.write(path, encoding="utf-8", xml_declaration=True)
