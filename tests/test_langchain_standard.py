"""LangChain's own standard integration tests for `ChatOpenAI` and `OpenAIEmbeddings`, run against a
real Hearth serving SmolLM2-135M-Instruct and all-MiniLM-L6-v2.

The features are declared as OpenAI has them wherever Hearth implements them. A test marked
`xfail` here fails because a 135M model does not do what it is asked, not because of the server:
each reason says what the model cannot do and a model that does it.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
from langchain_openai import ChatOpenAI, OpenAIEmbeddings
from langchain_tests.integration_tests import (
    ChatModelIntegrationTests,
    EmbeddingsIntegrationTests,
)

from tests.conftest import Gateway, link_tree

pytestmark = [pytest.mark.real_model, pytest.mark.llama]

CHAT_MODEL = "smollm2-135m-instruct"
#: The same GGUF under a second name, for LangChain's `model=` override at call time.
OTHER_CHAT_MODEL = "smollm2-135m-instruct-again"
EMBEDDING_MODEL = "all-minilm-l6-v2"


@pytest.fixture(scope="module")
def hearth(tmp_path_factory: pytest.TempPathFactory, real_models: Path) -> Iterator[Gateway]:
    """A gateway serving the default chat and embedding models as `make run` installs them."""
    models = tmp_path_factory.mktemp("langchain-models")
    for name in (CHAT_MODEL, EMBEDDING_MODEL):
        link_tree(real_models / name, models / name)
        shutil.copy(real_models / f"{name}.yaml", models / f"{name}.yaml")
    chat_yaml = (real_models / f"{CHAT_MODEL}.yaml").read_text()
    again = chat_yaml.replace(f"name: {CHAT_MODEL}\n", f"name: {OTHER_CHAT_MODEL}\n")
    (models / f"{OTHER_CHAT_MODEL}.yaml").write_text(again)
    gateway = Gateway(models).start()
    yield gateway
    gateway.cleanup()


@pytest.fixture(autouse=True)
def _point_at_hearth(request: pytest.FixtureRequest, hearth: Gateway) -> None:
    """The standard classes build their clients from properties: give those this gateway's URL.

    Autouse fixtures run before the classes' own `model` fixtures, on the same test instance.
    """
    request.instance.base_url = f"{hearth.url}/v1"


@pytest.fixture(scope="module")
def vcr_config() -> dict[str, Any]:
    """pytest-recording (which langchain-tests brings) wraps `test_stream_time` in a cassette,
    which would refuse the fixtures' own calls to this gateway before the test skips itself."""
    return {"ignore_localhost": True}


def model_limit(reason: str) -> pytest.MarkDecorator:
    """An expected failure that is SmolLM2-135M's limit; strict, so a pass is noticed too."""
    return pytest.mark.xfail(reason=reason, strict=True)


class TestHearthChatOpenAI(ChatModelIntegrationTests):
    """`ChatOpenAI` pointed at Hearth's `/v1/chat/completions`."""

    base_url: str

    @pytest.fixture(autouse=True)
    def _cold_chat_models(self, hearth: Gateway) -> None:
        """Each test starts with the chat models unloaded, so its outcome does not hang on the
        tests before it: SmolLM2's greedy answers turn on near ties, which a prompt read from
        llama.cpp's cache rather than afresh (as earlier requests left it) can tip."""
        for name in (CHAT_MODEL, OTHER_CHAT_MODEL):
            httpx.post(f"{hearth.url}/backends/{name}/unload", timeout=60).raise_for_status()

    @property
    def chat_model_class(self) -> type[ChatOpenAI]:
        return ChatOpenAI

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {
            "model": CHAT_MODEL,
            "base_url": self.base_url,
            "api_key": "unused",
            "temperature": 0,
            # LangChain's integration classes set no limit; a looping answer stops here, not at
            # the model YAML's 512.
            "max_tokens": 100,
            # A 100-token answer takes a second here, but minutes on a CPU that other llama.cpp
            # processes also spin on; pytest-timeout (300 s) is the limit that matters.
            "timeout": 300,
            "max_retries": 0,
            # OpenAI sends usage in a stream's last chunk when asked; so does Hearth. LangChain
            # asks on its own only when it talks to api.openai.com.
            "stream_usage": True,
        }

    @property
    def has_tool_calling(self) -> bool:
        return True

    @property
    def has_tool_choice(self) -> bool:
        return True

    @property
    def has_structured_output(self) -> bool:
        return True

    @property
    def supports_json_mode(self) -> bool:
        return True

    @property
    def returns_usage_metadata(self) -> bool:
        return True

    # Hearth serves text-only chat: no image, audio, PDF or video parts.
    @property
    def supports_image_inputs(self) -> bool:
        return False

    @property
    def supports_image_urls(self) -> bool:
        return False

    @property
    def supports_pdf_inputs(self) -> bool:
        return False

    @property
    def supports_audio_inputs(self) -> bool:
        return False

    @property
    def supports_video_inputs(self) -> bool:
        return False

    @property
    def supports_image_tool_message(self) -> bool:
        return False

    @property
    def supports_pdf_tool_message(self) -> bool:
        return False

    @property
    def supports_model_override(self) -> bool:
        return True

    @property
    def model_override_value(self) -> str:
        return OTHER_CHAT_MODEL

    @property
    def supported_usage_metadata_details(self) -> dict[Any, list[Any]]:
        # `prompt_tokens_details.cached_tokens`, read by LangChain as `cache_read`.
        return {"invoke": ["cache_read_input"], "stream": ["cache_read_input"]}

    def invoke_with_cache_read_input(self, *, stream: bool = False) -> AIMessage:
        """A conversation's second turn, whose first turn Hearth still holds in its cache."""
        model = ChatOpenAI(**self.chat_model_params)
        first = [
            SystemMessage("You are a helpful assistant who answers in one short sentence."),
            HumanMessage("Name a colour of the sky."),
        ]
        second = [*first, model.invoke(first), HumanMessage("And one of grass?")]
        if stream:
            chunks = list(model.stream(second))
            answer: AIMessage = sum(chunks[1:], chunks[0])
        else:
            answer = model.invoke(second)
        assert answer.usage_metadata is not None
        # LangChain only checks that the count is there; the cache should also have served it.
        assert answer.usage_metadata.get("input_token_details", {}).get("cache_read", 0) > 0
        return answer

    # SmolLM2-135M's limits. Greedy decoding makes each of these fail the same way every time.

    @model_limit(
        "Offered a get_weather tool with tool_choice auto, SmolLM2-135M answers 'What is the "
        "weather in San Francisco?' from memory in prose (it calls tools only when forced); a "
        "model trained for tool calls, such as Qwen2.5-7B-Instruct, calls get_weather"
    )
    @pytest.mark.parametrize("model", [{}, {"output_version": "v1"}], indirect=True)
    def test_agent_loop(self, model: BaseChatModel) -> None:
        super().test_agent_loop(model)

    @model_limit(
        "In JSON mode (any JSON object, held to JSON by a grammar) SmolLM2-135M nests "
        '{"setup": {"setup": ... until max_tokens instead of the two keys it is asked for, so '
        "the answer is cut off; Qwen2.5-7B-Instruct writes the setup and punchline object"
    )
    def test_json_mode(self, model: BaseChatModel) -> None:
        super().test_json_mode(model)

    @model_limit(
        "A pydantic.v1 schema makes LangChain force a named tool call; the grammar keeps the call "
        "well formed, but SmolLM2-135M repeats 'A cat is a cat, ...' inside `setup` until "
        "max_tokens, so the call never ends; Qwen2.5-7B-Instruct writes a short joke"
    )
    def test_structured_output_pydantic_2_v1(self, model: BaseChatModel) -> None:
        super().test_structured_output_pydantic_2_v1(model)

    # The same joke, held to a schema by response_format (LangChain's json_schema method). Under
    # llama.cpp's GBNF sampler these passed by chance: its grammar made the model spell "setup"
    # s-et-u-p, and from that context the model closed the string. With llguidance the key is
    # one token, and from there greedy SmolLM2 never ranks the closing quote first.
    _REPEATS = (
        "Asked for a joke about cats as {setup, punchline}, SmolLM2-135M writes "
        "'A cat is a cat, right? A cat is a cat, right? ...' inside setup until max_tokens, so "
        "the JSON is never closed (OpenAI's SDK raises LengthFinishReasonError); "
        "Qwen2.5-7B-Instruct writes a short joke"
    )

    @model_limit(_REPEATS)
    @pytest.mark.parametrize("schema_type", ["pydantic", "typeddict", "json_schema"])
    def test_structured_output(self, model: BaseChatModel, schema_type: Any) -> None:
        super().test_structured_output(model, schema_type)

    @model_limit(_REPEATS)
    @pytest.mark.parametrize("schema_type", ["pydantic", "typeddict", "json_schema"])
    async def test_structured_output_async(self, model: BaseChatModel, schema_type: Any) -> None:
        await super().test_structured_output_async(model, schema_type)

    @model_limit(_REPEATS)
    def test_structured_output_optional_param(self, model: BaseChatModel) -> None:
        super().test_structured_output_optional_param(model)


class TestHearthOpenAIEmbeddings(EmbeddingsIntegrationTests):
    """`OpenAIEmbeddings` pointed at Hearth's `/v1/embeddings`."""

    base_url: str

    @property
    def embeddings_class(self) -> type[OpenAIEmbeddings]:
        return OpenAIEmbeddings

    @property
    def embedding_model_params(self) -> dict[str, Any]:
        return {
            "model": EMBEDDING_MODEL,
            "base_url": self.base_url,
            "api_key": "unused",
            "max_retries": 0,
            # Otherwise LangChain tokenizes with tiktoken (OpenAI's tokenizer, downloaded) and
            # sends token arrays, which only mean something to OpenAI's own models.
            "check_embedding_ctx_length": False,
        }
