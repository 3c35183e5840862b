# The seed guide's broadcasting chat view ("Broadcasting to All Clients"), copied verbatim.
from dwebsocket import require_websocket

# chat/views.py (Improved for broadcasting)
# Use a list to keep track of all connected clients
# IMPORTANT: This is a simple in-memory solution and not for production.
connected_clients = []
@require_websocket
def chat_view(request):
    # Add the new client to our list
    connected_clients.append(request.websocket)
    print(f"New client connected. Total clients: {len(connected_clients)}")
    while request.websocket.connected:
        try:
            message = request.websocket.wait()
            if message:
                print(f"Broadcasting message: {message}")
                # Broadcast the message to all other connected clients
                for client in connected_clients:
                    if client != request.websocket and client.connected:
                        client.send(message)
        except Exception as e:
            print(f"WebSocket error: {e}")
            break
    # When the client disconnects, remove it from the list
    connected_clients.remove(request.websocket)
    print(f"Client disconnected. Total clients: {len(connected_clients)}")
