"""tailor-benchmarker: `python -m tailor_benchmarker`."""

from tailor_benchmarker.servicer import register
from tailor_runtime.server import run
from tailor_runtime.settings import ServiceSettings, load_settings


def main() -> None:
    run(load_settings(ServiceSettings, "benchmarker", port=50054), register)


if __name__ == "__main__":
    main()
