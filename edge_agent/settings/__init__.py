"""Settings: strict, frozen pydantic models (`model.Settings` and its tables in `remote`, `watch`;
the shared base, name check and URL redaction in `base`), camera sources as written (`sources`),
the model catalog (`catalog`), and reading the TOML file, its conf.d and the environment into one
immutable snapshot (`files.load_settings`). Imports run one way: base, remote/watch, model,
sources, catalog, files. Imports only `protocol/`, `errors` and `hardware` of the package: never
paho, cv2, sqlite3, ORT GenAI, nor any package that uses the settings."""
