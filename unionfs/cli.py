def main() -> None:
    raise SystemExit("not yet")


def overlay_main() -> None:
    raise SystemExit("not yet")
