"""The official `openai` Python client against a running `camelid serve`.

Usage: python openai_client.py BASE_URL MODEL
Prints one line per check and ends with 'N passed, 0 failed'; exits non-zero on a failure.
"""

import json
import math
import sys

import openai
from openai import OpenAI

base_url, model = sys.argv[1], sys.argv[2]
client = OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=300)
passed = 0


def check(name, cond, detail=""):
    global passed
    if not cond:
        print(f"FAIL {name}: {detail}")
        sys.exit(1)
    passed += 1
    print(f"ok {name}")


ids = [m.id for m in client.models.list().data]
check("models.list", ids == [model], ids)
one = client.models.retrieve(model)
check("models.retrieve", one.id == model and one.object == "model", one)
try:
    client.models.retrieve("no-such-model")
    check("models.retrieve of an unknown model fails", False)
except openai.NotFoundError as e:
    check("models.retrieve of an unknown model is NotFoundError", e.status_code == 404, e)

c = client.completions.create(model=model, prompt="The capital of France is", max_tokens=8, temperature=0)
check("completions", c.choices[0].text and c.usage.completion_tokens > 0, c)
check("usage adds up", c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens, c.usage)

msgs = [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "Name a color."}]
r = client.chat.completions.create(model=model, messages=msgs, max_tokens=16, temperature=0)
text = r.choices[0].message.content
check("chat", r.choices[0].message.role == "assistant" and text, r)

parts, usage = [], None
for chunk in client.chat.completions.create(model=model, messages=msgs, max_tokens=16, temperature=0,
                                            stream=True, stream_options={"include_usage": True}):
    if chunk.choices and chunk.choices[0].delta.content:
        parts.append(chunk.choices[0].delta.content)
    if chunk.usage:
        usage = chunk.usage
check("chat stream equals chat", "".join(parts) == text, (parts, text))
check("stream usage", usage is not None and usage.completion_tokens == r.usage.completion_tokens, usage)

parts = [ch.choices[0].text for ch in client.completions.create(
    model=model, prompt="Once upon a time", max_tokens=12, temperature=0, stream=True)]
whole = client.completions.create(model=model, prompt="Once upon a time", max_tokens=12, temperature=0)
check("completion stream", "".join(parts) == whole.choices[0].text, (parts, whole.choices[0].text))

a = client.chat.completions.create(model=model, messages=msgs, max_tokens=12, temperature=1.0, n=3, seed=7)
b = client.chat.completions.create(model=model, messages=msgs, max_tokens=12, temperature=1.0, n=3, seed=7)
ta = [x.message.content for x in a.choices]
check("n > 1", len(ta) == 3 and [x.index for x in a.choices] == [0, 1, 2], ta)
check("seed reproducible", ta == [x.message.content for x in b.choices], (ta, b.choices))

lp = client.chat.completions.create(model=model, messages=msgs, max_tokens=6, temperature=0,
                                    logprobs=True, top_logprobs=2)
content = lp.choices[0].logprobs.content
check("chat logprobs", content and all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content), content)

e = client.completions.create(model=model, prompt="Paris is the capital of", max_tokens=1, temperature=0,
                              logprobs=1, echo=True)
l = e.choices[0].logprobs
check("echo", e.choices[0].text.startswith("Paris is the capital of"), e.choices[0].text)
check("echo prompt logprobs", l.token_logprobs[0] is None and all(
    x is not None and x <= 0 for x in l.token_logprobs[1:]) and len(l.tokens) == len(l.text_offset), l)

emb = client.embeddings.create(model=model, input=["a red apple", "a green pear"])
v = emb.data[0].embedding
check("embeddings", len(emb.data) == 2 and abs(math.sqrt(sum(x * x for x in v)) - 1) < 1e-4, len(v))

schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"]}
js = client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "Invent a person, in JSON."}], max_tokens=80,
    temperature=0, response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}})
person = json.loads(js.choices[0].message.content)
check("json_schema output validates", isinstance(person.get("name"), str) and isinstance(person.get("age"), int)
      and set(person) == {"name", "age"}, person)

tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
tc = client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "Weather in Oslo?"}], tools=tools,
    tool_choice={"type": "function", "function": {"name": "get_weather"}}, max_tokens=60, temperature=0)
calls = tc.choices[0].message.tool_calls
check("tool_calls", tc.choices[0].finish_reason == "tool_calls" and calls[0].function.name == "get_weather"
      and isinstance(json.loads(calls[0].function.arguments)["city"], str), tc)

try:
    client.chat.completions.create(model="no-such-model", messages=msgs)
    check("unknown model raises", False)
except openai.NotFoundError as err:
    check("unknown model raises NotFoundError", err.body and "message" in err.body, err.body)

try:
    client.chat.completions.create(model=model, messages=[])
    check("empty messages raise", False)
except openai.BadRequestError as err:
    check("empty messages raise BadRequestError", err.body.get("param") == "messages", err.body)

print(f"{passed} passed, 0 failed")
