// dwebsocket.js as an ES module: import DWebSocket from ".../dwebsocket.mjs";
import "./dwebsocket.js";

export const DWebSocket = globalThis.DWebSocket;
export default DWebSocket;
