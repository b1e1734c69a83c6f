// Socket.IO long-polling clients for the soak (`cargo xtask soak`), with Socket.IO's own
// client: one per source address, every request on a new TCP connection from that address.
// Each client keeps a session for 20 to 50 s (a tick every 250 ms, acknowledged by the worker),
// ends it, stays idle longer than the app's session_affinity (so that its next session may go to
// another generation), and starts again; a session that breaks is started again after 1 s.
// Runs until killed. Prints one JSON line per event, times in ms since the epoch:
//
//   {"ev":"start","t":…,"src":…,"pid":…,"generation":…}     a session began (the worker said hello)
//   {"ev":"lost","t":…,"src":…,"pid":…,"generation":…,"reason":…}   reason: Socket.IO's, with the
//                                                                  failed request's status and error
//   {"ev":"end","t":…,"src":…}                              a session ended as planned
//   {"ev":"ticks","t":…,"n":…}                              acknowledged ticks in the last second
//   {"ev":"hello","t":…,"pid":…}                            first: this process's pid
//
//   node soak-sessions.js URL AFFINITY_SECONDS SRC...
"use strict";
const http = require("http");
const { io } = require("socket.io-client");

const [url, affinity, ...sources] = process.argv.slice(2);
const idle = (Number(affinity) + 3) * 1000;
let ticks = 0;
const emit = (o) => process.stdout.write(JSON.stringify({ t: Date.now(), ...o }) + "\n");

// What engine.io says of a failed request: "xhr poll error" or "xhr post error", the HTTP status
// (0: no answer), and the answer's first line or the socket error (ECONNREFUSED, ECONNRESET).
function why(e) {
  if (!e || typeof e !== "object") return "";
  const ctx = e.context && typeof e.context === "object" ? e.context : {};
  const text = typeof ctx.responseText === "string" ? ctx.responseText.split("\n")[0].slice(0, 120) : "";
  const status = typeof e.description === "number" ? e.description : e.description?.message ?? "";
  return ` (${e.message ?? ""} ${status} ${text})`.replace(/\s+\)/, ")");
}

function session(src) {
  const agent = new http.Agent({ keepAlive: false, localAddress: src });
  const socket = io(url, { transports: ["polling"], agent, reconnection: false, forceNew: true, timeout: 5000 });
  const me = { src, pid: null, generation: null };
  let over = false;
  let timer = null;
  const finish = (next, event) => {
    if (over) return;
    over = true;
    clearInterval(timer);
    socket.disconnect();
    emit(event);
    setTimeout(() => session(src), next);
  };
  const lose = (reason) => finish(1000, { ev: "lost", ...me, reason });
  socket.on("hello", (who) => {
    me.pid = who.pid;
    me.generation = who.generation;
    emit({ ev: "start", ...me });
    let n = 0;
    timer = setInterval(() => {
      n += 1;
      socket.timeout(5000).emit("tick", n, (err, res) => {
        if (over) return;
        if (err) return lose(`tick ${n}: ${err.message}`);
        if (res.pid !== me.pid) return lose(`tick ${n} answered by pid ${res.pid}, not ${me.pid}`);
        ticks += 1;
      });
    }, 250);
    setTimeout(() => finish(idle, { ev: "end", src }), 20000 + Math.random() * 30000);
  });
  socket.on("connect_error", (e) => lose(`connect_error: ${e.message}${why(e)}`));
  socket.on("disconnect", (reason, details) => lose(`disconnect: ${reason}${why(details)}`));
}

emit({ ev: "hello", pid: process.pid });
setInterval(() => {
  emit({ ev: "ticks", n: ticks });
  ticks = 0;
}, 1000);
sources.forEach((src, i) => setTimeout(() => session(src), i * 100));
