"""Chat templates: each family renders its own markers, a model without a template gets its family's (with a
warning), --chat-template / models.toml choose another, and `tandem run --show-prompt` prints the prompt."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest

from tandem import chat, templates
from tandem.config import ModelOptions, RegistryOptions, SpecOptions
from tandem.engine.llama import Model
from tandem.errors import BadInputError
from tandem.models.library import Library
from tandem.runtime import Runtime, chat_format, plan_runtime, tokenize_prompt
from tandem.tools import ToolRequest

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
CALLED = [{"role": "user", "content": "Hi"},
          {"role": "assistant", "content": "", "tool_calls": [
              {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}]},
          {"role": "tool", "tool_call_id": "c1", "content": "42"}]

GOLDEN = {
    "chatml": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
              "Hello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n",
    "gemma": "<s><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
             "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n",
    "llama3": "<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|><|start_header_id|>user"
              "<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|><|start_header_id|>assistant"
              "<|end_header_id|>\n\n",
    "llama2": "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello! </s><s>[INST] Bye [/INST]",
    "mistral": "<s>[INST] Hi[/INST]Hello!</s>[INST] Be brief.\n\nBye[/INST]",
    "phi3": "<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\nHello!<|end|>\n<|user|>\nBye<|end|>\n"
            "<|assistant|>\n",
}

# Tools offered and a call with its result in the history, for the families with a native tool format.
GOLDEN_TOOLS = {
    "chatml": '<|im_start|>system\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n'
              'You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n'
              '{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}\n</tools>\n\n'
              'For each function call, return a json object with function name and arguments within '
              '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": '
              '<args-json-object>}\n</tool_call><|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n'
              '<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call><|im_end|>\n<|im_start|>user\n'
              '<tool_response>\n42\n</tool_response><|im_end|>\n<|im_start|>assistant\n',
    "llama3": '<s><|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\n\nYou have access to the '
              'following functions. To call a function, respond with a JSON object of the form {"name": function '
              'name, "parameters": dictionary of argument name and its value}, and nothing else.\n\n'
              '{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}\n\n<|eot_id|>'
              '<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>'
              '\n\n{"name": "f", "parameters": {"a": 1}}<|eot_id|><|start_header_id|>ipython<|end_header_id|>\n\n42'
              '<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n',
    "mistral": '<s>[AVAILABLE_TOOLS] [{"type": "function", "function": {"name": "f", "parameters": {"type": '
               '"object"}}}][/AVAILABLE_TOOLS][INST] Hi[/INST][TOOL_CALLS] [{"name": "f", "arguments": {"a": 1}, '
               '"id": "c1"}]</s>[TOOL_RESULTS] {"content": "42", "call_id": "c1"}[/TOOL_RESULTS]',
}


def _fmt(name: str) -> templates.ChatFormat:
    return templates.ChatFormat(name, templates.builtin_source(name), "option", templates.BUILTIN[name], "<s>", "</s>")


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_each_family_renders_its_markers(name):
    assert chat.prompt_text(_fmt(name), CHAT) == GOLDEN[name]


@pytest.mark.parametrize("name", sorted(GOLDEN_TOOLS))
def test_native_tool_formats_render_tools_calls_and_results(name):
    assert chat.prompt_text(_fmt(name), CALLED, ToolRequest((TOOL,))) == GOLDEN_TOOLS[name]


@pytest.mark.parametrize("name", ["gemma", "llama2", "phi3"])
def test_families_without_tool_support_get_the_generic_prompt(name):
    text = chat.prompt_text(_fmt(name), CALLED, ToolRequest((TOOL,)))
    assert "You can call tools." in text
    assert '{"tool_calls": [{"name": "f", "arguments": {"a": 1}, "id": "c1"}]}' in text
    assert '{"tool_response": {"tool_call_id": "c1", "content": "42"}}' in text
    assert "You can call tools." not in chat.prompt_text(_fmt(name), CALLED)  # history alone offers no tools


def test_every_builtin_is_known_by_name_and_format():
    assert set(templates.BUILTIN) == set(GOLDEN)
    assert all(f in templates.TOOL_FORMATS for f in templates.BUILTIN.values())


@pytest.mark.parametrize("arch,tokens,expect", [
    ("gemma3", (), "gemma"), ("gemma2", (), "gemma"), ("gemma", (), "gemma"), ("qwen2", (), "chatml"),
    ("qwen3", (), "chatml"), ("phi3", (), "phi3"), ("mistral", (), "mistral"),
    ("llama", ("<|start_header_id|>",), "llama3"), ("llama", ("<|im_start|>",), "chatml"),
    ("llama", ("[INST]",), "mistral"), ("llama", (), "llama2"), ("rwkv7", (), None)])
def test_family_is_picked_from_the_architecture_and_vocabulary(arch, tokens, expect):
    assert templates.family_template(arch, lambda t: t in tokens) == expect


def test_select_prefers_option_then_gguf_then_family_then_chatml(tmp_path):
    none = lambda _t: False  # noqa: E731
    own = "{% for m in messages %}<tool_call>{{ m.content }}{% endfor %}"
    assert templates.select("m", gguf_template=own, arch="gemma3", has_token=none).origin == "gguf"
    assert templates.select("m", gguf_template=own, arch="gemma3", has_token=none).tool_format == "hermes"
    picked = templates.select("m", gguf_template=own, arch="gemma3", has_token=none, option="phi3")
    assert (picked.name, picked.origin, picked.warning) == ("phi3", "option", None)
    fallback = templates.select("gemma-270m", gguf_template=None, arch="gemma3", has_token=none)
    assert (fallback.name, fallback.origin) == ("gemma", "architecture")
    assert "gemma-270m has no chat template" in fallback.warning and "gemma3" in fallback.warning
    unknown = templates.select("odd", gguf_template=None, arch="rwkv7", has_token=none)
    assert (unknown.name, unknown.origin) == ("chatml", "default") and "rwkv7" in unknown.warning
    f = tmp_path / "mine.jinja"
    f.write_text("{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}[assistant]")
    mine = templates.select("m", gguf_template=None, arch="gemma3", has_token=none, option=str(f))
    assert mine.name == str(f) and chat.prompt_text(mine, CHAT[:2]) == "[system] Be brief.\n[user] Hi\n[assistant]"
    with pytest.raises(BadInputError, match="neither a built-in template nor a file") as e:
        templates.select("m", gguf_template=None, arch="llama", has_token=none, option="no-such-template")
    assert e.value.param == "chat_template"


def test_tool_format_is_read_from_a_templates_text():
    assert templates.tool_format_of("... [TOOL_CALLS] ...") == "mistral"
    assert templates.tool_format_of("... <|python_tag|> ...") == "llama3"
    assert templates.tool_format_of("{% if tools %}<tool_call>{% endif %}") == "hermes"
    assert templates.tool_format_of("{% for m in messages %}{{ m.content }}{% endfor %}") == "generic"


# -- on the tiny models --------------------------------------------------------------------------------------
def test_gemma3_without_a_template_gets_the_gemma_template_with_a_warning(tiny, caplog):
    with caplog.at_level(logging.WARNING, logger="tandem.runtime"):
        rt = Runtime(ModelOptions(model=str(tiny["gemma3"]), draft="none", ctx_size=256, threads=1),
                     spec=SpecOptions(), announce=lambda _s: None)
    try:
        fmt = rt.chat_format
        assert (fmt.name, fmt.origin, fmt.tool_format) == ("gemma", "architecture", "generic")
        assert any("has no chat template in its GGUF" in r.message and "gemma3" in r.message for r in caplog.records)
        prompt = rt.render([{"role": "user", "content": "Hi"}])
        assert prompt == f"{fmt.bos_token}<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
        tokens = rt.prompt(messages=[{"role": "user", "content": "Hi"}])
        assert tokens[0] == rt.main_model.bos and tokens.count(rt.main_model.bos) == 1  # BOS written once
    finally:
        rt.close()


def test_a_model_with_its_own_template_keeps_it(tiny):
    m = Model(tiny["main"])
    try:
        fmt = chat_format(m)
        assert (fmt.name, fmt.origin, fmt.warning, fmt.tool_format) == ("gguf", "gguf", None, "generic")
        assert chat_format(m, "gemma").name == "gemma"
        # special tokens written as text are parsed in a raw prompt (one token each), as llama-server does
        assert len(tokenize_prompt(m, "<|im_start|>user")) < len(m.tokenize("<|im_start|>user", parse_special=False))
    finally:
        m.close()


def test_models_toml_chat_template_reaches_the_model_options(tiny, tmp_path):
    conf = tmp_path / "models.toml"
    conf.write_text(f'[models."{tiny["gemma3"].stem}"]\nchat_template = "chatml"\n')
    lib = Library.open(RegistryOptions(config=str(conf)), extra=[tiny["gemma3"]])
    opts, _ = lib.resolve(ModelOptions(model=str(tiny["gemma3"]), draft="none"), SpecOptions())
    assert opts.chat_template == "chatml"
    flag, _ = lib.resolve(ModelOptions(model=str(tiny["gemma3"]), draft="none", chat_template="phi3"), SpecOptions(),
                          frozenset({"chat_template"}))
    assert flag.chat_template == "phi3"  # the command line wins


def _tandem(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tandem", "run", *args], capture_output=True, text=True, timeout=300)


def test_show_prompt_prints_the_template_applied_and_warns_about_a_fallback(tiny):
    out = _tandem("--model", str(tiny["gemma3"]), "--draft", "none", "--prompt", "Hi there", "--show-prompt")
    assert out.returncode == 0, out.stderr
    assert out.stdout.endswith("<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n")
    assert "has no chat template in its GGUF" in " ".join(out.stderr.split())
    chosen = _tandem("--model", str(tiny["gemma3"]), "--draft", "none", "--prompt", "Hi", "--show-prompt",
                     "--chat-template", "phi3")
    assert chosen.returncode == 0 and chosen.stdout == "<|user|>\nHi<|end|>\n<|assistant|>\n"
    assert "no chat template" not in chosen.stderr
    bad = _tandem("--model", str(tiny["main"]), "--draft", "none", "--prompt", "Hi", "--show-prompt",
                  "--chat-template", "nope")
    assert bad.returncode != 0 and "neither a built-in template nor a file" in bad.stderr


def test_an_unknown_chat_template_is_refused_before_loading(tiny):
    with pytest.raises(BadInputError, match="neither a built-in template nor a file"):
        plan_runtime(ModelOptions(model=str(tiny["main"]), draft="none", chat_template="nope"), announce=lambda _s: None)
