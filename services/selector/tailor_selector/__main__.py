"""tailor-selector: `python -m tailor_selector`."""

from tailor_runtime.server import run
from tailor_runtime.settings import ServiceSettings, load_settings
from tailor_selector.servicer import register


def main() -> None:
    settings = load_settings(ServiceSettings, "selector", port=50056)
    run(settings, register, serve_operations=False)


if __name__ == "__main__":
    main()
