"""Median times and ratios from a pytest-benchmark JSON file, as a Markdown table per group.

    python bench/summarize.py bench/top_p.json [--baselines softmax hf_warper reference]
"""
import argparse
import json
from collections import defaultdict


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("json_path")
    parser.add_argument("--baselines", nargs="+", default=None,
                        help="contenders to divide by (default: each benchmark's extra_info baseline)")
    args = parser.parse_args()
    with open(args.json_path) as handle:
        report = json.load(handle)
    groups = defaultdict(dict)
    for bench in report["benchmarks"]:
        contender = bench["extra_info"].get("contender", bench["name"])
        groups[bench["group"]][contender] = bench
    machine = report.get("machine_info", {})
    print(f"machine: {machine.get('cpu', {}).get('brand_raw', '?')}, "
          f"{machine.get('cpu', {}).get('count', '?')} cpus; {report.get('datetime', '')}\n")
    for group, benches in groups.items():
        baselines = args.baselines or sorted({b["extra_info"].get("baseline") for b in benches.values()} - {None})
        baselines = [name for name in baselines if name in benches]
        # Benchmarks that also measure memory record extra_info peak_mib.
        with_memory = any("peak_mib" in bench["extra_info"] for bench in benches.values())
        memory_header = " peak MiB |" if with_memory else ""
        print(f"### {group}\n")
        print("| contender | median (ms) | " + " | ".join(f"x {name}" for name in baselines) + " |" + memory_header)
        print("|---|---:|" + "---:|" * len(baselines) + ("---:|" if with_memory else ""))
        for contender, bench in benches.items():
            median = bench["stats"]["median"]
            ratios = [median / benches[name]["stats"]["median"] for name in baselines]
            memory = f" {bench['extra_info'].get('peak_mib', '-')} |" if with_memory else ""
            print(f"| {contender} | {median * 1e3:.3f} | " + " | ".join(f"{r:.2f}" for r in ratios) + " |" + memory)
        print()


if __name__ == "__main__":
    main()
