"""tailor-quantizer: `python -m tailor_quantizer`."""

from tailor_quantizer.servicer import register
from tailor_runtime.server import run
from tailor_runtime.settings import ServiceSettings, load_settings


def main() -> None:
    run(load_settings(ServiceSettings, "quantizer", port=50052), register)


if __name__ == "__main__":
    main()
