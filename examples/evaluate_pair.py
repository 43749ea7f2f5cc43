"""Evaluate any two models with the same tokenizer on one leakage / utility harness.

python examples/evaluate_pair.py patched --against path/to/base --people people.jsonl
"""

import argparse

import exporter
from exporter.evaluate.summary import attack_rows, comparison_rows, markdown_table


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("model", help="the model to test, e.g. an export folder")
    ap.add_argument("--against", required=True, help="the model to compare with, e.g. its base")
    ap.add_argument(
        "--people",
        help="JSONL of name, email, phone, split (default: people.jsonl beside --against)",
    )
    ap.add_argument(
        "--no-adversarial", action="store_true", help="leave out the adversarial attacks"
    )
    ap.add_argument(
        "--no-user-path",
        action="store_true",
        help="leave out the fresh-process rows (both models loaded as users load them)",
    )
    args = ap.parse_args()

    result = exporter.compare(
        args.model,
        args.against,
        people=args.people,
        adversarial=not args.no_adversarial,
        user_path=not args.no_user_path,
        progress=False,
    )
    print(markdown_table(*attack_rows(result), text_columns=4))
    print()
    print(markdown_table(*comparison_rows(result)))


if __name__ == "__main__":
    main()
