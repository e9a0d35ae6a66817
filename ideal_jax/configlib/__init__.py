"""ml_collections configs: load, check, serialise, fingerprint; guard workdirs.

  loading.py   configs/NAME.py[:ARG] → a checked ConfigDict; `derived` copies with fields changed
  checks.py    enumerated fields and ranges of the sections without a typed config, fields that
               must agree, `check_fields` (what each typed config checks itself with) and
               `section_fields` (a section's fields for a typed config)
  machine.py   the config against this machine: mesh and batch against the devices, paths
  fields.py    a config as JSON, its flat fields and fingerprint; RESUMABLE_FIELDS
  workdir.py   DIR/config.json: written once; a rerun resumes only with the same config

Defaults live in configs/common.py only; nothing here imports configs/ (the entry point passes
them: ideal_jax/main.py `default_fields`).
"""
