/*
 * dwebsocket.js: a WebSocket-like client for dwebsocket views, with a
 * long-polling fallback, automatic reconnection and recovery of the group
 * broadcasts missed while reconnecting. No build step, no dependencies. Load
 * it as a classic script (window.DWebSocket) or import it as an ES module
 * (export default / export { DWebSocket }).
 *
 *   const socket = new DWebSocket("/ws/chat/", {
 *     protocols: [],                       // subprotocols, as for WebSocket
 *     transports: ["websocket", "polling"], // tried in this order
 *     reconnect: true,                     // or {initialDelay, maxDelay, maxBuffer}
 *     connectTimeout: 10000,               // ms a transport may take to open
 *     positions: {},                       // {group: "epoch:seq"}, pinned by {% websocket_position %}
 *     recoverTimeout: 3000,                // ms after an open that "recover" waits for the joins
 *     heartbeat: 15000,                    // ms of silence before a ping; lost after twice that (0: off)
 *   });
 *   socket.onopen / onmessage / onclose / onerror / onrecover, addEventListener(...)
 *   socket.send(text or ArrayBuffer/Blob/TypedArray), socket.close(code, reason)
 *
 * Differences from WebSocket, on purpose: after a close other than a clean
 * 1000 or 1001 it reconnects (with exponential backoff and jitter; after 1012,
 * "service restart", at once, within a random part of initialDelay), firing "close" and then
 * "open" again; messages sent while it is not open are kept (up to
 * maxBuffer, 1000 by default) and sent in order once it is. A transport that
 * does not open within connectTimeout counts as failed (a proxy that holds the
 * handshake), and a poll that is not answered connectTimeout after the server's
 * poll timeout counts as a lost connection (a server or network gone silent).
 *
 * Recovery (docs/delivery.md), over either transport: the client offers the
 * "dwebsocket.v1" subprotocol (each page subprotocol p as "dwebsocket.v1+p",
 * then "dwebsocket.v1"; in the polling open's "protocols"). If the server takes
 * it, every message in either direction is a header, "\n", then the payload;
 * the page sees only payloads, and `protocol` is the page's own subprotocol.
 * The client keeps the position of the last broadcast it got from each group
 * and the ids of its last 5 connections, and sends them, with its own random
 * id, on every connection (query parameter "dwebsocket.v1", of the WebSocket
 * URL or of the polling open); the server first replays what the page missed.
 * Then "recover" fires once: event.recovered (false if some broadcasts were no
 * longer kept) and event.groups ({group: {recovered, position}}). A server
 * whose answer does not name dwebsocket.v1 gets plain messages (a failed
 * WebSocket handshake is tried once more without offering it).
 *
 * Acknowledged sends, on a dwebsocket.v1 connection: the page's messages are
 * numbered (header {"n": k}) and kept until the server acknowledges them (a
 * view read them); after a reconnect the welcome says which number the views
 * read up to, and the later ones are sent again, in order, before newer ones,
 * so each reaches a view once. Until the welcome, sends wait. The messages
 * kept (waiting for a connection, or for their ack) count against maxBuffer.
 * Heartbeat: after `heartbeat` ms with nothing received the client sends a
 * ping; with nothing at all received for twice that, the connection counts as
 * lost (1006) and the client reconnects and recovers.
 */
(function (root) {
  "use strict";

  var CONNECTING = 0, OPEN = 1, CLOSING = 2, CLOSED = 3;
  var SERVICE_RESTART = 1012;
  var SEND_RETRY_MS = 250; // after a polling send the server answered 429 (its view is behind)
  var PROTOCOL = "dwebsocket.v1"; // the subprotocol of docs/delivery.md, and its resume query parameter
  var KEPT_CONNECTION_IDS = 5;
  var NEWLINE = 0x0a;
  var PING = '{"t":"ping"}\n'; // the heartbeat, exactly as the server knows it

  // The page's id in every resume ("c"): 64 random bits as 16 hex digits. It
  // is the page's secret (whoever knows it could move its read marks): without
  // a cryptographic random source there is none, and no acknowledged sends.
  function randomId() {
    if (!root.crypto || typeof root.crypto.getRandomValues !== "function") return null;
    var bytes = root.crypto.getRandomValues(new Uint8Array(8)), id = "";
    for (var i = 0; i < bytes.length; i++) id += (bytes[i] < 16 ? "0" : "") + bytes[i].toString(16);
    return id;
  }

  function absoluteUrl(url, scheme) {
    var parsed = new URL(url, root.location.href);
    if (scheme === "ws") {
      parsed.protocol = parsed.protocol === "https:" || parsed.protocol === "wss:" ? "wss:" : "ws:";
    } else {
      parsed.protocol = parsed.protocol === "wss:" || parsed.protocol === "https:" ? "https:" : "http:";
    }
    return parsed;
  }

  function withParams(url, params) {
    var parsed = new URL(url.toString());
    Object.keys(params).forEach(function (key) { parsed.searchParams.set(key, params[key]); });
    return parsed.toString();
  }

  function toBase64(buffer) {
    var bytes = new Uint8Array(buffer), chunks = [], size = 0x8000;
    for (var i = 0; i < bytes.length; i += size) {
      chunks.push(String.fromCharCode.apply(null, bytes.subarray(i, i + size)));
    }
    return root.btoa(chunks.join(""));
  }

  function fromBase64(text) {
    var binary = root.atob(text), bytes = new Uint8Array(binary.length);
    for (var i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
    return bytes.buffer;
  }

  /* -- dwebsocket.v1 messages: header "\n" payload ------------------------- */

  // What the page offers: "dwebsocket.v1+<p>" for each of its subprotocols, then "dwebsocket.v1".
  function offeredProtocols(protocols) {
    if (typeof protocols === "string") protocols = [protocols];
    return protocols.map(function (p) { return PROTOCOL + "+" + p; }).concat([PROTOCOL]);
  }

  // The server's answer: null if it speaks plain WebSocket, else the page's own subprotocol ("" if none).
  function acceptedProtocol(answer) {
    if (typeof answer !== "string" || answer.indexOf(PROTOCOL) !== 0) return null;
    var rest = answer.slice(PROTOCOL.length);
    return rest.charAt(0) === "+" ? rest.slice(1) : "";
  }

  var utf8Decoder = null;
  function decodeUtf8(bytes) {
    if (!utf8Decoder) utf8Decoder = new root.TextDecoder("utf-8");
    return utf8Decoder.decode(bytes);
  }

  // Splits a message (a string, or an ArrayBuffer) into {header, payload}:
  // header is null for an empty header (a plain message), the parsed JSON
  // object otherwise, or undefined if it is not one (the message is then
  // ignored); the payload keeps the message's type. A message without a
  // newline is taken as a payload without a header. For either transport.
  function parseMessage(data) {
    var header, index;
    if (typeof data === "string") {
      index = data.indexOf("\n");
      if (index < 0) return { header: null, payload: data };
      header = data.slice(0, index);
      data = data.slice(index + 1);
    } else {
      var bytes = new Uint8Array(data);
      index = bytes.indexOf(NEWLINE);
      if (index < 0) return { header: null, payload: data };
      header = decodeUtf8(bytes.subarray(0, index));
      data = data.slice(index + 1);
    }
    if (!header) return { header: null, payload: data };
    try { header = JSON.parse(header); } catch (e) { header = undefined; }
    if (header === null || typeof header !== "object" || Array.isArray(header)) header = undefined;
    return { header: header, payload: data };
  }

  // A message with *header* (a JSON text, or "" for the empty one) before
  // what the page's send() gave (a string or an ArrayBuffer), of the same type.
  function framedMessage(header, data) {
    if (typeof data === "string") return header + "\n" + data;
    var head = new root.TextEncoder().encode(header);
    var framed = new Uint8Array(head.length + 1 + data.byteLength);
    framed.set(head, 0);
    framed[head.length] = NEWLINE;
    framed.set(new Uint8Array(data), head.length + 1);
    return framed.buffer;
  }

  // A message with an empty header, as the page's send() gave it.
  function plainMessage(data) { return framedMessage("", data); }

  /* -- the WebSocket transport --------------------------------------------- */

  // plain: offer only the page's own subprotocols (a server that does not speak dwebsocket.v1).
  function WebSocketTransport(owner, plain) {
    var ws, opened = false, failed = false, timer = null, session = false;
    this.name = "websocket";
    this.plain = !!plain;
    this.resumed = []; // the groups the resume parameter of this connection named
    this.session = false; // true once the server took dwebsocket.v1
    this.start = function () {
      if (typeof root.WebSocket !== "function") { owner._transportFailed(this, "no WebSocket"); return; }
      var url = absoluteUrl(owner.url, "ws"), resume = plain ? null : owner._resume();
      if (resume) {
        url.searchParams.set(PROTOCOL, JSON.stringify(resume));
        this.resumed = Object.keys(resume.p);
      }
      try {
        ws = new root.WebSocket(url.toString(), plain ? owner._protocols : offeredProtocols(owner._protocols));
      } catch (error) { owner._transportFailed(this, error); return; }
      ws.binaryType = "arraybuffer";
      var self = this;
      function fail(why) {
        if (opened || failed) return;
        failed = true;
        root.clearTimeout(timer);
        owner._transportFailed(self, why);
      }
      timer = root.setTimeout(function () {
        fail("handshake timed out");
        try { ws.close(); } catch (e) { /* already closing */ }
      }, owner._connectTimeout);
      ws.onopen = function () {
        if (failed) return;
        opened = true;
        root.clearTimeout(timer);
        var protocol = acceptedProtocol(ws.protocol);
        session = protocol !== null;
        self.session = session;
        owner._transportOpened(self, session ? protocol : ws.protocol || "");
      };
      ws.onmessage = function (event) {
        if (!opened) return;
        if (!session) { owner._received(event.data); return; }
        owner._heard(self);
        var message = parseMessage(event.data);
        owner._receivedMessage(self, message.header, message.payload);
      };
      ws.onclose = function (event) {
        if (!opened) fail("handshake failed");
        else owner._transportClosed(self, event.code, event.reason, event.wasClean);
      };
    };
    // header: a dwebsocket.v1 header (JSON text), or none for the empty one.
    this.send = function (data, header) { ws.send(session ? framedMessage(header || "", data) : data); };
    this.ping = function () { ws.send(PING); };
    this.close = function (code, reason) { try { ws.close(code, reason); } catch (e) { ws.close(); } };
  }

  /* -- the long-polling transport ---------------------------------------------- */

  function PollingTransport(owner) {
    var sid = null, closed = false, queue = [], sending = false, self = this, session = false;
    var base = absoluteUrl(owner.url, "http");
    this.name = "polling";
    this.plain = false;
    this.resumed = []; // the groups the resume parameter of this session named
    this.session = false; // true once the server took dwebsocket.v1

    var pollTimeout = 25000; // the server's WEBSOCKET_POLL_TIMEOUT, as its open answer tells

    // timeout: ms after which the request is given up (rejects), or 0 for none.
    // extra: more query parameters (the resume, for an open).
    function request(method, action, body, timeout, extra) {
      var params = Object.assign({ dwebsocket: action }, extra || {}), controller = null, timer = null;
      if (sid) params.sid = sid;
      if (timeout && typeof root.AbortController === "function") {
        controller = new root.AbortController();
        timer = root.setTimeout(function () { controller.abort(); }, timeout);
      }
      var done = function () { root.clearTimeout(timer); };
      return root.fetch(withParams(base, params), {
        method: method,
        credentials: "same-origin",
        cache: "no-store",
        headers: body === undefined ? {} : { "Content-Type": "application/json" },
        body: body === undefined ? undefined : JSON.stringify(body),
        signal: controller ? controller.signal : undefined,
      }).then(function (response) { done(); return response; }, function (error) { done(); throw error; });
    }

    function finish(code, reason, wasClean) {
      if (closed) return;
      closed = true;
      owner._transportClosed(self, code, reason, wasClean);
    }

    function poll() {
      if (closed) return;
      request("GET", "poll", undefined, pollTimeout + owner._connectTimeout).then(function (response) {
        if (!response.ok) throw new Error("poll answered " + response.status);
        return response.json();
      }).then(function (batch) {
        if (closed) return;
        if (session) owner._heard(self); // an answer, even an empty one, is a sign of life
        batch.messages.forEach(function (item) {
          var data = item.text !== undefined ? item.text : fromBase64(item.binary);
          if (!session) { owner._received(data); return; }
          var message = parseMessage(data);
          owner._receivedMessage(self, message.header, message.payload);
        });
        if (batch.close) finish(batch.close.code, batch.close.reason, true);
        else poll();
      }).catch(function () { finish(1006, "", false); });
    }

    function flush() {
      if (sending || closed || !queue.length) return;
      sending = true;
      var batch = queue.splice(0, queue.length);
      request("POST", "send", { messages: batch }).then(function (response) {
        if (response.status === 429) {
          // The view has not read what came before: send the same batch again, a little later.
          queue = batch.concat(queue);
          setTimeout(function () { sending = false; flush(); }, SEND_RETRY_MS);
          return;
        }
        if (!response.ok) throw new Error("send answered " + response.status);
        sending = false;
        flush();
      }).catch(function () { sending = false; finish(1006, "", false); });
    }

    this.start = function () {
      if (typeof root.fetch !== "function") { owner._transportFailed(this, "no fetch"); return; }
      // As over WebSocket: offer dwebsocket.v1 (and dwebsocket.v1+<p>), the resume in the open's query.
      var resume = owner._resume(), extra = {};
      extra[PROTOCOL] = JSON.stringify(resume);
      this.resumed = Object.keys(resume.p);
      var body = { protocols: offeredProtocols(owner._protocols) };
      request("POST", "open", body, owner._connectTimeout, extra).then(function (response) {
        if (!response.ok) throw new Error("open answered " + response.status);
        return response.json();
      }).then(function (opened) {
        sid = opened.sid;
        if (typeof opened.timeout === "number") pollTimeout = opened.timeout * 1000;
        var protocol = acceptedProtocol(opened.subprotocol);
        session = self.session = protocol !== null;
        owner._transportOpened(self, session ? protocol : opened.subprotocol || "");
        poll();
      }).catch(function (error) { owner._transportFailed(self, error); });
    };
    // header: a dwebsocket.v1 header (JSON text), or none for the empty one.
    function enqueue(data) {
      queue.push(typeof data === "string" ? { text: data } : { binary: toBase64(data) });
      flush();
    }
    this.send = function (data, header) { enqueue(session ? framedMessage(header || "", data) : data); };
    this.ping = function () { enqueue(PING); };
    this.close = function (code, reason) {
      if (closed) return;
      request("POST", "close", { code: code || 1000, reason: reason || "" }).catch(function () {});
      finish(code || 1000, reason || "", true);
    };
  }

  var TRANSPORTS = { websocket: WebSocketTransport, polling: PollingTransport };

  /* -- DWebSocket -------------------------------------------------------------- */

  function DWebSocket(url, options) {
    options = options || {};
    var reconnect = options.reconnect === undefined ? true : options.reconnect;
    this.url = url;
    this.readyState = CONNECTING;
    this.protocol = "";
    this.transport = null; // "websocket" or "polling" once open
    this.binaryType = "blob";
    this.onopen = this.onmessage = this.onclose = this.onerror = this.onrecover = null;
    this._protocols = options.protocols || [];
    this._connectTimeout = options.connectTimeout || 10000;
    this._transports = options.transports || ["websocket", "polling"];
    this._reconnect = reconnect ? {
      initialDelay: reconnect.initialDelay || 500,
      maxDelay: reconnect.maxDelay || 10000,
      maxBuffer: reconnect.maxBuffer || 1000,
    } : null;
    this._recoverTimeout = options.recoverTimeout === undefined ? 3000 : options.recoverTimeout;
    this._heartbeat = options.heartbeat === undefined ? 15000 : options.heartbeat; // ms, 0: off
    // Per group, the position ("epoch:seq") of the last broadcast received, or a pinned one.
    this._positions = {};
    var pinned = options.positions || {};
    Object.keys(pinned).forEach(function (group) {
      if (typeof pinned[group] === "string" && pinned[group]) this._positions[group] = pinned[group];
    }, this);
    this._connectionIds = []; // the ids of the last connections (welcome), oldest first
    this._recovery = null; // {transport, groups: {group: result or null}, timer} until "recover" fires
    this._listeners = {};
    this._buffer = []; // messages waiting for a connection that can take them
    // Acknowledged sends: the page's id, the number of its last numbered
    // message, and the numbered messages not acknowledged yet ({n, data}), oldest first.
    this._clientId = randomId();
    this._numbered = 0;
    this._unacked = [];
    this._attempt = 0;
    this._closedByUser = false;
    this._connect(0);
  }

  DWebSocket.CONNECTING = DWebSocket.prototype.CONNECTING = CONNECTING;
  DWebSocket.OPEN = DWebSocket.prototype.OPEN = OPEN;
  DWebSocket.CLOSING = DWebSocket.prototype.CLOSING = CLOSING;
  DWebSocket.CLOSED = DWebSocket.prototype.CLOSED = CLOSED;

  DWebSocket.prototype.addEventListener = function (type, listener) {
    (this._listeners[type] = this._listeners[type] || []).push(listener);
  };
  DWebSocket.prototype.removeEventListener = function (type, listener) {
    this._listeners[type] = (this._listeners[type] || []).filter(function (l) { return l !== listener; });
  };
  DWebSocket.prototype._emit = function (type, fields) {
    var event;
    try { event = new root.Event(type); } catch (e) { event = { type: type }; }
    Object.keys(fields || {}).forEach(function (key) {
      Object.defineProperty(event, key, { value: fields[key], enumerable: true });
    });
    var handler = this["on" + type];
    if (typeof handler === "function") handler.call(this, event);
    (this._listeners[type] || []).slice().forEach(function (listener) { listener.call(this, event); }, this);
  };

  DWebSocket.prototype._connect = function (index) {
    if (index >= this._transports.length) { this._lost(1006, "", false); return; }
    var Transport = TRANSPORTS[this._transports[index]];
    if (!Transport) { this._connect(index + 1); return; }
    this._transportIndex = index;
    this._pending = new Transport(this);
    this._pending.start();
  };

  DWebSocket.prototype._transportFailed = function (transport, error) {
    if (transport !== this._pending) return;
    this._pending = null;
    // A browser fails a handshake whose answer names no subprotocol when one was
    // offered, and a server that does not speak dwebsocket.v1 (an older one, or
    // another) answers so to a page that asked for none: try a failed handshake
    // once more without dwebsocket.v1 before the next transport.
    if (transport.name === "websocket" && !transport.plain && error === "handshake failed") {
      this._pending = new WebSocketTransport(this, true);
      this._pending.start();
      return;
    }
    this._connect(this._transportIndex + 1);
  };

  DWebSocket.prototype._transportOpened = function (transport, protocol) {
    if (transport !== this._pending) return;
    this._active = transport;
    this._pending = null;
    this._attempt = 0;
    this.transport = transport.name;
    this.protocol = protocol;
    if (this._closedByUser) { transport.close(1000, ""); return; }
    this.readyState = OPEN;
    if (transport.session) {
      if (transport.resumed.length) this._startRecovery(transport);
      this._startHeartbeat(transport);
    }
    this._emit("open");
    // A dwebsocket.v1 connection takes messages once its welcome came (_receivedMessage).
    if (!transport.session && this._active === transport) {
      this._plainOpened();
      if (this._active === transport) this._ready(transport, false);
    }
  };

  // A plain connection (the server did not take dwebsocket.v1: an older one,
  // or the plain retry of a handshake that failed, as one to a server still
  // restarting does) recovers nothing, and its broadcasts carry no positions:
  // the page is told that what it missed is lost, and the positions are
  // forgotten (a later connection must not replay what came meanwhile).
  DWebSocket.prototype._plainOpened = function () {
    var lost = Object.keys(this._positions);
    this._positions = {};
    if (!lost.length) return;
    var groups = {};
    lost.forEach(function (group) { groups[group] = { recovered: false, position: null }; });
    this._emit("recover", { recovered: false, groups: groups });
  };

  // *transport* takes messages: first the unacknowledged ones, again, then
  // those that waited. acks: whether it acknowledges them (numbers them).
  DWebSocket.prototype._ready = function (transport, acks) {
    transport.ready = true;
    transport.acks = acks;
    var unacked = this._unacked;
    if (!acks) this._unacked = []; // a connection without acks: sent once more, unnumbered
    unacked.forEach(function (item) {
      if (acks) transport.send(item.data, JSON.stringify({ n: item.n }));
      else transport.send(item.data);
    });
    var buffered = this._buffer.splice(0, this._buffer.length);
    buffered.forEach(function (data) { this._transmit(transport, data); }, this);
  };

  // Sends *data* on *transport* (ready), numbered if it acknowledges.
  DWebSocket.prototype._transmit = function (transport, data) {
    if (!transport.acks) { transport.send(data); return; }
    var n = ++this._numbered;
    this._unacked.push({ n: n, data: data });
    transport.send(data, JSON.stringify({ n: n }));
  };

  // Drops the numbered messages up to *n*: a view has read them.
  DWebSocket.prototype._acknowledged = function (n) {
    var unacked = this._unacked, count = 0;
    while (count < unacked.length && unacked[count].n <= n) count++;
    if (count) unacked.splice(0, count);
  };

  /* The heartbeat, on a dwebsocket.v1 connection: a ping after `heartbeat` ms
   * with nothing received; the connection counts as lost after twice that. */
  DWebSocket.prototype._startHeartbeat = function (transport) {
    var self = this, every = this._heartbeat;
    if (!(every > 0)) return;
    transport.heard = Date.now();
    transport.pinged = false;
    function tick() {
      if (transport !== self._active) return;
      var quiet = Date.now() - transport.heard;
      if (quiet >= 2 * every) { self._silent(transport); return; }
      if (quiet >= every && !transport.pinged) {
        transport.pinged = true;
        try { transport.ping(); } catch (e) { /* closing: its close tells */ }
      }
      transport.heartbeatTimer = root.setTimeout(tick, (quiet >= every ? 2 * every : every) - quiet);
    }
    transport.heartbeatTimer = root.setTimeout(tick, every);
  };

  // Something came on *transport* (a dwebsocket.v1 one).
  DWebSocket.prototype._heard = function (transport) {
    transport.heard = Date.now();
    transport.pinged = false;
  };

  // *transport* went silent: lost, as if it had dropped (the next connection
  // resumes), without waiting for a close that may never come.
  DWebSocket.prototype._silent = function (transport) {
    this._transportClosed(transport, 1006, "", false);
    transport.close(1000, "");
  };

  DWebSocket.prototype._received = function (data) {
    if (typeof data !== "string" && this.binaryType === "blob" && typeof root.Blob === "function") {
      data = new root.Blob([data]);
    }
    this._emit("message", { data: data });
  };

  // A message of a dwebsocket.v1 connection: header (null: none, undefined: unreadable) and payload.
  DWebSocket.prototype._receivedMessage = function (transport, header, payload) {
    if (transport !== this._active) return;
    if (header === null) { this._received(payload); return; }
    if (header === undefined) return;
    var group = typeof header.g === "string" ? header.g : null;
    if (header.t === undefined) {
      if (group === null) return; // not a broadcast: a header of a later version
      if (typeof header.p === "string") this._positions[group] = header.p;
      this._received(payload);
    } else if (header.t === "welcome") {
      if (typeof header.id !== "string" || transport.ready) return;
      this._connectionIds.push(header.id);
      if (this._connectionIds.length > KEPT_CONNECTION_IDS) this._connectionIds.shift();
      // "n": the last of the page's messages a view has read; the later ones go again.
      var acks = typeof header.n === "number";
      if (acks) this._acknowledged(header.n);
      this._ready(transport, acks);
    } else if (header.t === "ack") {
      if (typeof header.n === "number") this._acknowledged(header.n);
    } else if (header.t === "joined") {
      if (group === null) return;
      var position = typeof header.p === "string" && header.p ? header.p : null;
      // Without "p" the server could not read the group's history (Redis
      // down): keep the old position, from which a later connection may recover.
      if (position) this._positions[group] = position;
      this._joined(transport, group, header.r === true, position);
    } else if (header.t === "left") {
      if (group !== null) delete this._positions[group];
    }
    // Any other "t": a message of a later version, ignored.
  };

  // The resume parameter of the next dwebsocket.v1 connection: positions,
  // earlier connection ids, and the page's id (its messages are numbered).
  DWebSocket.prototype._resume = function () {
    var positions = {};
    Object.keys(this._positions).forEach(function (group) { positions[group] = this._positions[group]; }, this);
    var resume = { p: positions, x: this._connectionIds.slice() };
    if (this._clientId) resume.c = this._clientId;
    return resume;
  };

  DWebSocket.prototype._startRecovery = function (transport) {
    var self = this, groups = {};
    transport.resumed.forEach(function (group) { groups[group] = null; });
    this._recovery = {
      transport: transport,
      groups: groups,
      timer: root.setTimeout(function () { self._recovered(transport); }, this._recoverTimeout),
    };
  };

  DWebSocket.prototype._joined = function (transport, group, recovered, position) {
    var recovery = this._recovery;
    if (!recovery || recovery.transport !== transport || !(group in recovery.groups)) return;
    if (recovery.groups[group] !== null) return; // joined again: the first join told
    recovery.groups[group] = { recovered: recovered, position: position };
    var groups = recovery.groups;
    if (Object.keys(groups).every(function (g) { return groups[g] !== null; })) this._recovered(transport);
  };

  // Fires "recover" for the connection of *transport*: every group it named joined, or the time is up.
  DWebSocket.prototype._recovered = function (transport) {
    var recovery = this._recovery;
    if (!recovery || recovery.transport !== transport) return;
    this._recovery = null;
    root.clearTimeout(recovery.timer);
    var groups = {}, all = true;
    Object.keys(recovery.groups).forEach(function (group) {
      var result = recovery.groups[group] || { recovered: false, position: null }; // not joined in time
      groups[group] = result;
      all = all && result.recovered;
    });
    this._emit("recover", { recovered: all, groups: groups });
  };

  DWebSocket.prototype._transportClosed = function (transport, code, reason, wasClean) {
    if (transport !== this._active) return;
    this._active = null;
    root.clearTimeout(transport.heartbeatTimer);
    if (this._recovery && this._recovery.transport === transport) {
      // Lost before it could tell: the next connection resumes from where this one got.
      root.clearTimeout(this._recovery.timer);
      this._recovery = null;
    }
    this._lost(code, reason, wasClean);
  };

  DWebSocket.prototype._lost = function (code, reason, wasClean) {
    var retry = this._reconnect && !this._closedByUser && !(wasClean && (code === 1000 || code === 1001));
    // One "close" per lost connection: attempts to reconnect that fail stay quiet.
    var announce = !retry || this._attempt === 0;
    this.readyState = retry ? CONNECTING : CLOSED;
    if (announce) {
      if (!wasClean) this._emit("error");
      this._emit("close", { code: code, reason: reason, wasClean: wasClean });
    }
    if (!retry) return;
    var self = this, base = this._reconnect.initialDelay * Math.pow(2, this._attempt);
    var delay = Math.min(this._reconnect.maxDelay, base) * (0.5 + Math.random() / 2);
    // 1012 (service restart): the server closed every client at once on its way
    // down, and another one is ready. Come back at once, each client after a
    // random delay in [0, initialDelay), so they do not all arrive together.
    if (code === SERVICE_RESTART && this._attempt === 0) delay = Math.random() * this._reconnect.initialDelay;
    this._attempt += 1;
    root.setTimeout(function () { if (!self._closedByUser) self._connect(0); }, delay);
  };

  DWebSocket.prototype.send = function (data) {
    if (this.readyState === CLOSED || this._closedByUser) throw new Error("DWebSocket is closed");
    if (typeof data !== "string") {
      if (data instanceof root.Blob) {
        var self = this;
        data.arrayBuffer().then(function (buffer) { self.send(buffer); });
        return;
      }
      if (ArrayBuffer.isView(data)) data = data.buffer.slice(data.byteOffset, data.byteOffset + data.byteLength);
    }
    // Kept: the messages waiting for a connection, and those not acknowledged yet.
    if (this._buffer.length + this._unacked.length >= (this._reconnect ? this._reconnect.maxBuffer : 1000)) {
      throw new Error("DWebSocket: too many messages waiting for the connection or its acknowledgement");
    }
    if (this.readyState === OPEN && this._active && this._active.ready) { this._transmit(this._active, data); return; }
    this._buffer.push(data);
  };

  DWebSocket.prototype.close = function (code, reason) {
    this._closedByUser = true;
    if (this._active) {
      this.readyState = CLOSING;
      this._active.close(code || 1000, reason || "");
    } else if (this.readyState !== CLOSED) {
      this.readyState = CLOSED;
      this._emit("close", { code: code || 1000, reason: reason || "", wasClean: true });
    }
  };

  root.DWebSocket = DWebSocket;
})(typeof window !== "undefined" ? window : globalThis);
