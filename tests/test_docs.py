import dataclasses
import re
from pathlib import Path

from fedunlearn.config import Config

README = Path(__file__).resolve().parents[1] / "README.md"


def test_every_config_key_is_documented_with_its_default():
    text = README.read_text()
    rows = dict(re.findall(r"^\| `([a-z_]+\.[a-z_]+)` \| `([^`]*)` \|", text, flags=re.M))
    config = Config()
    for section in dataclasses.fields(config):
        for field in dataclasses.fields(getattr(config, section.name)):
            key = f"{section.name}.{field.name}"
            assert key in rows, f"{key} is missing from the README's config reference"
            value = getattr(getattr(config, section.name), field.name)
            shown = (
                f'"{value}"'
                if isinstance(value, str)
                else str(value).lower()
                if isinstance(value, bool)
                else str(value)
            )
            assert rows[key] == shown, f"README says {key} = {rows[key]}, the code says {shown}"
