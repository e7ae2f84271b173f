"""COMIC Lab: multi-label learning with partial labels and long-tailed classes (COMIC, ICCV 2023).

`import comic` loads the config only; torch-heavy modules (`comic.engine`, `comic.models`, ...) are imported
where used. Ray, Optuna and MLflow are never imported by the library core (only lazily by tune/tracking/ablation).
"""

from comic.config import Config, ConfigError, load_config

__all__ = ["Config", "ConfigError", "load_config", "__version__"]
__version__ = "0.1.0"
