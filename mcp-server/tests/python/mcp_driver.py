"""Drives mcp-server's Model Context Protocol tools with the official Python MCP SDK.

The test (tests/mcp_tools.rs) says what to do as a JSON plan on stdin and checks what
comes back on stdout: this script only speaks the protocol, it decides nothing.

    mcp_driver.py stdio COMMAND [ARG...]          spawn the server, talk over its stdio
    mcp_driver.py http URL CA_FILE TOKEN_FILE     streamable HTTP, HTTPS trusting CA_FILE

The plan is {"steps": [...]}, each step one of
    {"op": "list_tools"}
    {"op": "call", "tool": NAME, "arguments": {...}}
    {"op": "list_resource_templates"}
    {"op": "read_resource", "uri": URI}
The answer is {"initialize": {...}, "results": [...]}, one result per step.
"""

import asyncio
import json
import ssl
import sys

import httpx2
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError


def dump(model):
    return model.model_dump(mode="json", by_alias=True, exclude_none=True)


async def run_steps(session, plan):
    init = await session.initialize()
    results = []
    for step in plan["steps"]:
        op = step["op"]
        try:
            if op == "list_tools":
                listed = await session.list_tools()
                results.append({"tools": [dump(t) for t in listed.tools]})
            elif op == "call":
                result = await session.call_tool(step["tool"], step.get("arguments"))
                results.append({"result": dump(result)})
            elif op == "list_resource_templates":
                listed = await session.list_resource_templates()
                results.append({"templates": [dump(t) for t in listed.resource_templates]})
            elif op == "read_resource":
                read = await session.read_resource(step["uri"])
                results.append({"contents": [dump(c) for c in read.contents]})
            else:
                raise ValueError(f"unknown op {op!r} in the plan")
        except MCPError as e:
            results.append({"protocol_error": {"code": e.error.code, "message": e.error.message}})
    return {"initialize": dump(init), "results": results}


async def over_stdio(command, args, plan):
    params = StdioServerParameters(command=command, args=args)
    async with stdio_client(params) as (read, write):
        async with ClientSession(read, write) as session:
            return await run_steps(session, plan)


async def over_http(url, ca_file, token_file, plan):
    with open(token_file) as f:
        token = f.read().strip()
    context = ssl.create_default_context(cafile=ca_file)
    client = httpx2.AsyncClient(
        verify=context,
        headers={"Authorization": f"Bearer {token}"},
        timeout=httpx2.Timeout(30.0, read=60.0),
    )
    async with client:
        async with streamable_http_client(url, http_client=client) as (read, write):
            async with ClientSession(read, write) as session:
                return await run_steps(session, plan)


def main(argv):
    plan = json.load(sys.stdin)
    if len(argv) >= 3 and argv[1] == "stdio":
        answer = asyncio.run(over_stdio(argv[2], argv[3:], plan))
    elif len(argv) == 5 and argv[1] == "http":
        answer = asyncio.run(over_http(argv[2], argv[3], argv[4], plan))
    else:
        sys.exit(__doc__)
    json.dump(answer, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main(sys.argv)
