"""The ASGI transport: websocket scopes through the project's views, frames over ASGI messages."""

__all__: list[str] = []
