"""config/schema.yaml, the one place where settings have their defaults and bounds, read from Python.

The library is used from its checkout (`pip install -e .` or PYTHONPATH=lib), so the schema sits at a
fixed place beside it. No torch import: Snakemake loads this on every call.
"""

from __future__ import annotations

import copy
import difflib
import functools
import math
import re
from pathlib import Path

import yaml

from .errors import ConfigError

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "config" / "schema.yaml"

# What a failed bound check says, by JSON-schema keyword.
_BOUNDS = {"minimum": ">=", "exclusiveMinimum": ">", "maximum": "<=", "exclusiveMaximum": "<"}


@functools.cache
def load_schema(path: str | Path = SCHEMA_PATH) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: not found; tinylm reads its defaults from config/schema.yaml of its "
                          f"checkout, so use it from there (pip install -e . or PYTHONPATH=lib)")
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def section(*keys: str) -> dict:
    """The schema of one settings section, e.g. ("train",), ("dataset", "synthetic") or ("model",):
    a key is looked up among the properties, else among the shared definitions ($defs)."""
    root = load_schema()
    node = root
    for key in keys:
        node = follow(root, node)
        node = node["properties"][key] if key in node.get("properties", {}) else root["$defs"][key]
    return follow(root, node)


def defaults(*keys: str) -> dict:
    """{setting: default} of one section (see `section`); a copy, safe to change.

    `x-default` counts too: config/schema.yaml uses it where Snakemake must not write the default
    into the config (see the note at the top of that file).
    """
    out = {}
    for key, spec in section(*keys)["properties"].items():
        for word in ("default", "x-default"):
            if word in spec:
                out[key] = copy.deepcopy(spec[word])
    return out


def check(value, schema: dict, prefix: str = "", *, root: dict | None = None) -> None:
    """Raise ConfigError naming every setting of `value` that `schema` refuses, each with its value and
    the rule it breaks, the most prominent first (the shallowest, as jsonschema's best_match picks);
    its `key` and `first` are that first one's. `prefix` is the dotted place of `value` in the config,
    e.g. "train"; `$ref`s resolve against `root` (default: config/schema.yaml)."""
    refuse(*problems(value, schema, prefix, root=root))


def problems(value, schema: dict, prefix: str = "", *, root: dict | None = None
             ) -> tuple[list[tuple[str | None, str]], str]:
    """What `check` would refuse, as (key, what is wrong) pairs, and the note its message ends with;
    for a caller that adds problems of its own before `refuse`."""
    import jsonschema  # only needed when checking; a dependency of Snakemake

    schema = {**schema, "$defs": (root or load_schema())["$defs"]}
    errors = _validator()(schema).iter_errors(value)
    # best_match of each alone descends into anyOf/oneOf branches to the one that explains it; then the
    # shallowest first, as best_match picks among several, else in the order of the config (the paths
    # themselves are not compared: YAML keys may be numbers beside strings)
    errors = sorted((jsonschema.exceptions.best_match([e]) for e in errors), key=lambda e: len(e.absolute_path))
    models = value.get("models") if not prefix and isinstance(value, dict) else None
    found = [problem for error in errors
             for problem in _problems(error, prefix, models if isinstance(models, dict) else {})]
    note = " (config/schema.yaml describes each key and its allowed values)" if found else ""
    # every bound compares false with nan, so a number setting may still be nan or infinite; a key the
    # schema already refused (a nan where text belongs) is named once, by the schema (_refuse)
    return found + [(key, f"{key} = {number}: give a finite number (YAML reads .nan and .inf as floats)")
                    for key, number in _non_finite(value, prefix)], note


@functools.cache
def _validator():
    """JSON Schema 2020-12 as jsonschema checks it, except that an integer must be written as one.

    The standard counts a whole float (YAML's `100.0`) as an integer. The jobs' own checks and torch
    refuse it, and Snakemake compares rule parameters as written: a data setting given as 100.0 instead
    of 100 is a changed parameter, so Snakemake deleted the built data before its job refused the value."""
    import jsonschema

    checker = jsonschema.Draft202012Validator.TYPE_CHECKER.redefine(
        "integer", lambda _, value: isinstance(value, int) and not isinstance(value, bool))
    return jsonschema.validators.extend(jsonschema.Draft202012Validator, type_checker=checker)


def refuse(problems: list[tuple[str | None, str]], note: str = "") -> None:
    """One ConfigError for `problems` (_refuse), if there are any."""
    if problems:
        _refuse(problems, note)


def _refuse(problems: list[tuple[str | None, str]], note: str) -> None:
    """One ConfigError for `problems` (key, what is wrong): one line a setting (a value that breaks two
    rules, say a type and an enum, is named once, by the first; the keys missing from one place are
    one line), the first one's key and line kept."""
    seen: set[str] = set()
    kept = []
    for key, why in problems:
        if key is None or key not in seen:
            kept.append((key, why))
        seen.add(key)
    kept = list(dict.fromkeys(kept))
    key, first = kept[0]
    if len(kept) == 1:
        raise ConfigError(f"{first}{note}", key=key, first=first)
    raise ConfigError(f"{len(kept)} settings refused{note}:" + "".join(f"\n  {why}" for _, why in kept),
                      key=key, first=first)


def _problems(error, prefix: str, models: dict) -> list[tuple[str | None, str]]:
    """(key, what is wrong) for one jsonschema error; one per unknown key of an additionalProperties error.
    `models`: the config's models: entries, for the model a misspelt entry likely means."""
    key = prefix
    for part in error.absolute_path:  # keys joined by dots, list positions in brackets: seeds[1]
        key += f"[{part}]" if isinstance(part, int) else f".{part}" if key else str(part)
    shown = "null" if error.instance is None else repr(error.instance)  # YAML's word, not Python's
    if key and error.validator in _BOUNDS:
        return [(key, f"{key} = {shown} must be {_BOUNDS[error.validator]} {error.validator_value}")]
    if key and error.validator == "enum":
        return [(key, f"{key} = {shown} must be one of {', '.join(map(str, error.validator_value))}")]
    if error.validator == "additionalProperties" and error.validator_value is False:
        allowed = list(error.schema.get("properties", {}))
        return [(f"{key}.{name}" if key else str(name), _unknown_key(name, allowed, key or "config"))
                for name in error.instance if name not in allowed]
    message = error.message
    if error.validator == "required":  # one error a missing key, each with the whole list: name them all
        missing = [name for name in error.validator_value if name not in error.instance]
        verb = "is a required property" if len(missing) == 1 else "are required properties"
        message = f"{', '.join(map(repr, missing))} {verb}"
    if error.validator == "type" and error.instance is None:  # Python's None for what YAML wrote as null
        message = "null" + message.removeprefix("None")
        if re.fullmatch(r"models\.[^.]+", key):
            message += ("; to train no run of this model, give it `seeds: []` (removed from an override file, "
                        "its entry in the config under it still trains)")
    return [(key or None,
             f"{key or 'config'}: {message}{_yaml_number_hint(error)}{_whole_model_hint(error, key, models)}")]


def _non_finite(value, key: str):
    """(key, value) for each nan or infinite float in `value`, keys written as check() writes them."""
    if isinstance(value, float) and not math.isfinite(value):
        yield key, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _non_finite(v, f"{key}.{k}" if key else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _non_finite(v, f"{key}[{i}]")


def _whole_model_hint(error, key: str, models: dict) -> str:
    """A models: entry missing a required key is often meant as a copy of another model with one
    change, or as another model's settings under a misspelt name (`baselien: {seeds: [1, 2]}`): name
    the model it likely means, say that each entry is a whole model, and the two ways to vary one."""
    if error.validator != "required" or not re.fullmatch(r"models\.[^.]+", key):
        return ""
    name = key.removeprefix("models.")
    # only seeds or train overrides: a model's settings under a misspelt name, not a new model's
    meant = isinstance(error.instance, dict) and set(error.instance) <= {"seeds", "train"}
    close = meant and closest_key(name, [str(m) for m in models if str(m) != name])
    return ((f"; did you mean {close!r}? (a new name is a new model)" if close else "")
            + "; each entry under models: is a whole model. To vary one setting of a model, give the new "
            "entry all of its keys (a YAML anchor and `<<: *name` copies them within one file), or sweep "
            "the setting (sweeps: {name: {model: condor, grid: {d_ff: [64]}}}, config/README.md)")


def _yaml_number_hint(error) -> str:
    """Why a number came as text, where it did. PyYAML (YAML 1.1) reads a float only with a point in
    its mantissa and a sign in its exponent, so `1e-3` and `1.0e3` arrive as strings; a number in
    quotes, or in Snakemake's --config (which passes every value as text), arrives as one too. And why a
    whole number with a point is refused where an integer belongs (`_validator`)."""
    wanted = error.validator_value if isinstance(error.validator_value, list) else [error.validator_value]
    text = error.instance
    if error.validator == "type" and "integer" in wanted and isinstance(text, float) and text.is_integer():
        return f": write {int(text)}, without the point (YAML reads {text} as a float)"
    if error.validator != "type" or not {"number", "integer"} & set(wanted) or not isinstance(text, str):
        return ""
    try:
        as_yaml = yaml.safe_load(text)
    except yaml.YAMLError:
        return ""
    if isinstance(as_yaml, (int, float)) and not isinstance(as_yaml, bool):
        return ": a number in quotes, or given with --config (which passes text): write it in a YAML file, unquoted"
    if "number" not in wanted:  # the spelling below makes a float; a whole number is written out
        try:
            value = float(text)
        except ValueError:
            return ""
        if not math.isfinite(value) or not value.is_integer():
            return ""
        return f": YAML reads {text} as text; write {int(value)}"
    mantissa, e, exponent = text.strip().lower().partition("e")
    if "." not in mantissa:
        mantissa += ".0"
    if exponent[:1] not in ("+", "-", ""):
        exponent = f"+{exponent}"
    spelled = f"{mantissa}{e}{exponent}"
    if not isinstance(value := yaml.safe_load(spelled), float) or not math.isfinite(value):
        return ""
    return f": YAML reads {text} as text; write {spelled} (a point in the number, a sign in the exponent)"


# What other codebases researchers come from call tinylm's settings (nanoGPT, Hugging Face configs):
# no spelling is close enough for difflib to find these.
KNOWN_AS = {
    "learning_rate": "lr", "min_learning_rate": "min_lr", "max_iters": "max_steps", "warmup_iters": "warmup_steps",
    "eval_interval": "eval_every", "log_interval": "log_every", "n_embd": "d_model", "hidden_size": "d_model",
    "n_layer": "n_layers", "num_hidden_layers": "n_layers", "num_attention_heads": "n_heads",
    "intermediate_size": "d_ff", "block_size": "max_seq_len", "max_position_embeddings": "max_seq_len",
    "num_experts": "n_experts", "num_experts_per_tok": "top_k", "router_aux_loss_coef": "aux_loss_coef",
}


def closest_key(name: str, allowed) -> str | None:
    """The allowed key `name` most likely means, or None: what other codebases call it (KNOWN_AS; of a
    dotted name its last part, the rest kept), else the closest spelling of the whole name."""
    allowed = list(allowed)
    head, dot, last = name.rpartition(".")
    if last in KNOWN_AS and f"{head}{dot}{KNOWN_AS[last]}" in allowed:
        return f"{head}{dot}{KNOWN_AS[last]}"
    close = difflib.get_close_matches(name, allowed, n=1, cutoff=0.7)
    return close[0] if close else None


def _unknown_key(name, allowed: list[str], where: str) -> str:
    """A short message for an unknown key: the closest allowed one, else the allowed ones."""
    name = str(name)
    close = closest_key(name, allowed)
    hint = f" (did you mean {close!r}?)" if close else f"; the keys allowed there: {', '.join(allowed)}"
    return f"unknown key {name!r} in {where}{hint}"


def follow(root: dict, node: dict) -> dict:
    """`node`, or what its $ref points to (a shared definition)."""
    while "$ref" in node:
        node = root["$defs"][node["$ref"].removeprefix("#/$defs/")]
    return node
