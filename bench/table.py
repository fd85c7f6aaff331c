"""The one Markdown table the benchmarks print: rows of a measure and its ratio to a base."""

from __future__ import annotations


def print_ratio_table(
    label: str, unit: str, rows: dict[str, float], base: float, ratio_name: str, digits: int = 3
) -> None:
    """`| label | unit | ratio_name |`, one row per entry: its value and value / base."""
    width = max(len(label), *(len(name) for name in rows))
    value_width = max(len(unit), 8)
    print(f"| {label:<{width}} | {unit:>{value_width}} | {ratio_name} |")
    print(f"|{'-' * (width + 2)}|{'-' * (value_width + 2)}|{'-' * (len(ratio_name) + 2)}|")
    for name, value in rows.items():
        ratio = f"{value / base:.2f}x"
        print(f"| {name:<{width}} | {value:{value_width}.{digits}f} | {ratio:>{len(ratio_name)}} |")
