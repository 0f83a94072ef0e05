"""Chat templates that render tools the way three model families do (written for these tests
after the families' documented prompt formats, not copied from their checkpoints), and a
helper that gives the tiny model one of them.

    hermes       Qwen2.5 / Qwen3: tools in <tools></tools> in the system turn, calls as
                 <tool_call>{json}</tool_call>, results as <tool_response> in a user turn
    llama3_json  Llama 3.1: tools as JSON in the user turn, calls as {"name", "parameters"},
                 results in an ipython turn
    mistral      Mistral: [AVAILABLE_TOOLS][...][/AVAILABLE_TOOLS], calls as
                 [TOOL_CALLS][{...}], results as [TOOL_RESULTS]...[/TOOL_RESULTS]
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

HERMES = """\
{%- if tools %}<|im_start|>system
You may call functions. Signatures:
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools>
Reply with <tool_call>{"name": <name>, "arguments": <args>}</tool_call> per call.<|im_end|>
{% endif %}
{%- for m in messages %}
{%- if m.role == 'assistant' and m.tool_calls %}<|im_start|>assistant
{%- for c in m.tool_calls %}
<tool_call>
{{ {"name": c.function.name, "arguments": c.function.arguments} | tojson }}
</tool_call>
{%- endfor %}<|im_end|>
{% elif m.role == 'tool' %}<|im_start|>user
<tool_response>
{{ m.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

LLAMA3_JSON = """\
{%- for m in messages %}
{%- if m.role == 'user' and loop.last and tools %}<|start_header_id|>user<|end_header_id|>

Answer with a function call as {"name": name, "parameters": arguments}, or <|python_tag|>.
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}
{{ m.content }}<|eot_id|>
{%- elif m.role == 'assistant' and m.tool_calls %}<|start_header_id|>assistant<|end_header_id|>

{% for c in m.tool_calls %}{{ {"name": c.function.name, "parameters": c.function.arguments} | tojson }}{% endfor %}<|eot_id|>
{%- elif m.role == 'tool' %}<|start_header_id|>ipython<|end_header_id|>

{{ m.content }}<|eot_id|>
{%- else %}<|start_header_id|>{{ m.role }}<|end_header_id|>

{{ m.content }}<|eot_id|>
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>

{% endif %}"""  # noqa: E501

MISTRAL = """\
{%- for m in messages %}
{%- if m.role == 'user' %}
{%- if loop.last and tools %}[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}
[INST]{{ m.content }}[/INST]
{%- elif m.role == 'assistant' and m.tool_calls %}[TOOL_CALLS]{{ m.tool_calls | map(attribute='function') | list | tojson }}</s>
{%- elif m.role == 'tool' %}[TOOL_RESULTS]{{ m.content }}[/TOOL_RESULTS]
{%- else %}{{ m.content }}</s>
{%- endif %}
{%- endfor %}"""  # noqa: E501

TEMPLATES = {"hermes": HERMES, "llama3_json": LLAMA3_JSON, "mistral": MISTRAL}


def with_template(model_dir: Path, out_dir: Path, template: str) -> Path:
    """A copy of `model_dir` whose tokenizer carries `template` (weights linked, not copied)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in model_dir.iterdir():
        target = out_dir / path.name
        if path.name == "tokenizer_config.json":
            config = json.loads(path.read_text(encoding="utf-8"))
            config["chat_template"] = template
            target.write_text(json.dumps(config), encoding="utf-8")
        elif path.suffix == ".safetensors":
            target.symlink_to(path)
        elif path.is_file():
            shutil.copy(path, target)
    return out_dir
