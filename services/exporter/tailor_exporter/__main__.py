"""tailor-exporter: `python -m tailor_exporter`."""

from tailor_exporter.servicer import register
from tailor_runtime.server import run
from tailor_runtime.settings import ServiceSettings, load_settings


def main() -> None:
    run(load_settings(ServiceSettings, "exporter", port=50055), register)


if __name__ == "__main__":
    main()
