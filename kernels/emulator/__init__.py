from .emulator import (DEFAULT_CHOICES, Choices, EmulatorError, EmulatorResult, Finding, build, emulate,
                       emulate_result, translation_unit)

__all__ = ["Choices", "DEFAULT_CHOICES", "EmulatorError", "EmulatorResult", "Finding", "build", "emulate",
           "emulate_result", "translation_unit"]
