"""The top frames of a py-spy raw profile (`py-spy record -f raw`): by own samples and by samples under them.
  python bench/spy_top.py spy_server.txt [--top 30] [--match r1kit/]
"""

from __future__ import annotations

import argparse
from collections import Counter


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("path")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--match", default="", help="only frames whose text contains this, for the inclusive list")
    args = parser.parse_args()
    own, under, total = Counter(), Counter(), 0
    with open(args.path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            frames, n = stack.split(";"), int(count)
            total += n
            own[frames[-1]] += n
            for frame in set(frames):
                under[frame] += n
    print(f"{total} samples\n-- own")
    for frame, n in own.most_common(args.top):
        print(f"{n / total:6.1%} {frame[:140]}")
    print("-- under")
    for frame, n in [(f, n) for f, n in under.most_common() if args.match in f][: args.top]:
        print(f"{n / total:6.1%} {frame[:140]}")


if __name__ == "__main__":
    main()
