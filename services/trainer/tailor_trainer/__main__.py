"""tailor-trainer: `python -m tailor_trainer`."""

from tailor_runtime.server import run
from tailor_runtime.settings import ServiceSettings, load_settings
from tailor_trainer.servicer import register


def main() -> None:
    run(load_settings(ServiceSettings, "trainer", port=50053), register)


if __name__ == "__main__":
    main()
