# The seed guide's first chat view (Step 3), copied verbatim.
# chat/views.py
from dwebsocket import require_websocket
from django.shortcuts import render
# This view serves the initial HTML page
def chat_page(request):
    return render(request, 'chat/chat.html')
# This view handles the WebSocket connection
@require_websocket
def chat_view(request):
    # This loop continues as long as the connection is open
    while request.websocket.connected:
        try:
            # Wait for a message from the client
            message = request.websocket.wait()
            # If the client sends a message, broadcast it to all connected clients
            # Note: For a real app, you'd need a way to track all connections.
            # This simple example just echoes back to the sender.
            # We'll improve this in the next step.
            if message:
                print(f"Received message: {message}")
                # Send the message back to the client who sent it
                request.websocket.send(f"You said: {message}")
        except Exception as e:
            # Handle disconnections or errors
            print(f"WebSocket error: {e}")
            break
