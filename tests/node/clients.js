// Socket.IO long-polling clients for the session tests, with Socket.IO's own client: one per
// source address, every request on a new TCP connection from that address (no keep-alive), each
// client ticking every 200 ms for `seconds`, then disconnecting. Prints one JSON line: per
// client, the workers and generations that answered it, its ticks, and every error or
// disconnect (a session lost shows as "transport error" / "Session ID unknown").
//
//   node clients.js URL SECONDS SRC...
"use strict";
const http = require("http");
const { io } = require("socket.io-client");

const [url, seconds, ...sources] = process.argv.slice(2);
const results = {};
let open = sources.length;

for (const src of sources) {
  const r = { src, connects: 0, ticks: 0, failed: [], pids: [], generations: [] };
  results[src] = r;
  const agent = new http.Agent({ keepAlive: false, localAddress: src });
  const socket = io(url, { transports: ["polling"], agent, reconnection: false, forceNew: true, timeout: 5000 });
  const seen = (who) => {
    if (!r.pids.includes(who.pid)) r.pids.push(who.pid);
    if (!r.generations.includes(who.generation)) r.generations.push(who.generation);
  };
  socket.on("connect", () => { r.connects += 1; });
  socket.on("hello", seen);
  socket.on("connect_error", (e) => r.failed.push(`connect_error: ${e.message}`));
  socket.on("disconnect", (reason) => {
    if (reason !== "io client disconnect") r.failed.push(`disconnect: ${reason}`);
  });
  let n = 0;
  const timer = setInterval(() => {
    if (!socket.connected) return;
    n += 1;
    socket.timeout(5000).emit("tick", n, (err, res) => {
      if (err) return r.failed.push(`tick ${n}: ${err.message}`);
      r.ticks += 1;
      seen(res);
    });
  }, 200);
  setTimeout(() => {
    clearInterval(timer);
    // Let the last ticks answer, then leave.
    setTimeout(() => {
      socket.disconnect();
      if (--open === 0) {
        console.log(JSON.stringify(Object.values(results)));
        process.exit(0);
      }
    }, 1000);
  }, Number(seconds) * 1000);
}
