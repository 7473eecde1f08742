#!/usr/bin/env node
/*
 * Bulkhead JavaScript kernel: stateful, notebook-style cell execution inside a sandbox.
 *
 * Node.js 18+, no npm packages. Started as `node kernel.js` with pipes for stdin/stdout/
 * stderr and the sandbox home as cwd; speaks the line protocol in KERNEL.md (JSON requests
 * on stdin, JSON events on stdout) with "language": "javascript".
 *
 * Cells run as vm.Script in one vm context, so top-level let/const/class/function
 * declarations persist across cells; the completion value of the cell becomes the
 * text/plain result (util.inspect; undefined gives no result). `require` resolves from the
 * cwd. `console` in the context writes stdout events (log/info/debug/dir/table) and stderr
 * events (error/warn/trace); process.stdout.write/process.stderr.write are redirected too,
 * so modules that use the real console are captured. Output produced while no cell runs
 * (timers that fire later) is sent with the id of the next cell.
 *
 * Top-level await: a cell that does not compile as a script but mentions `await` runs as
 * the body of an async function. Its last expression statement (found by asking V8 which
 * suffix of the cell parses as an expression) is its value. Its top-level declarations
 * (let/const/var, simple destructuring, function, class) are assigned to globals of the same
 * names when the cell completes, so later cells see them; they are not declared lexically
 * (a later `const x` of the same name is allowed) and are not exported if the cell throws.
 * A cell whose only await is written like a call, e.g. `await (p)`, compiles as a script
 * (a call to a function named await) and fails with a ReferenceError: write `await p`.
 *
 * Limits:
 * - Interrupt: SIGINT stops synchronous cell code (vm breakOnSigint) and ends a cell that
 *   is awaiting a promise (the promise keeps running), with a KeyboardInterrupt error; the
 *   context keeps its state. SIGINT while idle is ignored. A synchronous loop that runs
 *   after an await (in a promise callback) cannot be interrupted, and a SIGINT that lands
 *   in the few microseconds in which vm switches its SIGINT watchdog on or off kills the
 *   process (Node restores the default handler there): in both cases the host restarts the
 *   kernel, and the context is lost.
 * - Redeclaring a top-level let/const in a later script cell is a SyntaxError, as in the
 *   Node REPL.
 * - Child processes started with stdio "inherit" write straight onto the protocol
 *   channel: use the default pipes (exec/execSync/spawn return the output).
 * - stdin is the protocol channel: cells must not read process.stdin.
 * - Objects from required modules come from the main realm (instanceof across realms).
 * - process.exit() in a cell ends the kernel.
 */
"use strict";

const path = require("path");
const readline = require("readline");
const util = require("util");
const vm = require("vm");
const { EventEmitter } = require("events");
const { createRequire } = require("module");
const { Worker } = require("worker_threads");

let cellId = null; // id of the running cell; output is attributed to it
let pending = []; // output produced while idle, sent with the next cell
let count = 0;

// Protocol lines are written to fd 1 by a worker thread. vm's breakOnSigint terminates the
// main thread's JavaScript wherever it is, even inside a write: handing each whole line over
// with one postMessage means an interrupt can drop a line but never leave half of one.
const WRITER = `
const { parentPort, workerData: backlog } = require("worker_threads");
const fs = require("fs");
parentPort.on("message", (line) => {
  if (line === null) return parentPort.postMessage("drained");
  const data = Buffer.from(line);
  for (let off = 0; off < data.length; ) {
    try {
      off += fs.writeSync(1, data, off);
    } catch (err) {
      if (err.code !== "EAGAIN") return parentPort.postMessage("broken");
      Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 5);
    }
  }
  Atomics.sub(backlog, 0, line.length);
  Atomics.notify(backlog, 0);
});`;
const MAX_BACKLOG = 8 * 1024 * 1024; // characters queued for the writer before send() waits
const backlog = new Int32Array(new SharedArrayBuffer(4));
const writer = new Worker(WRITER, { eval: true, workerData: backlog, stdout: true });
writer.on("message", (msg) => msg === "broken" && process.exit(1)); // the host is gone
writer.on("error", () => process.exit(1));

function send(event) {
  const line = JSON.stringify(event) + "\n";
  for (let queued; (queued = Atomics.load(backlog, 0)) > MAX_BACKLOG; ) {
    Atomics.wait(backlog, 0, queued, 100);
  }
  Atomics.add(backlog, 0, line.length);
  writer.postMessage(line);
}

function output(stream, chunk, encoding) {
  const text =
    typeof chunk === "string" ? chunk : Buffer.from(chunk).toString(encoding || "utf8");
  if (!text) return;
  if (cellId === null) pending.push([stream, text]);
  else send({ type: stream, id: cellId, text });
}

// process.stdout/stderr (used by the main realm's console and by modules) become stand-ins
// that send events; the real fd 1 belongs to the writer.
for (const [stream, fd] of [["stdout", 1], ["stderr", 2]]) {
  const standIn = Object.assign(new EventEmitter(), {
    fd,
    isTTY: false,
    writable: true,
    write(chunk, encoding, callback) {
      output(stream, chunk, typeof encoding === "string" ? encoding : undefined);
      const cb = typeof encoding === "function" ? encoding : callback;
      if (typeof cb === "function") process.nextTick(cb);
      return true;
    },
    end() {},
    cork() {},
    uncork() {},
    hasColors: () => false,
    getColorDepth: () => 1,
  });
  Object.defineProperty(process, stream, { configurable: true, enumerable: true, value: standIn });
}

const sink = (stream) => ({ write: (chunk) => (output(stream, String(chunk)), true) });
const cellConsole = new console.Console({
  stdout: sink("stdout"),
  stderr: sink("stderr"),
  colorMode: false,
  ignoreErrors: false,
});

const sandbox = {
  console: cellConsole,
  require: createRequire(path.join(process.cwd(), "<kernel>")),
  module: { exports: {} },
  __filename: path.join(process.cwd(), "<kernel>"),
  __dirname: process.cwd(),
};
sandbox.exports = sandbox.module.exports;
const context = vm.createContext(sandbox);
// Node's globals (Buffer, timers, URL, fetch, ...) that a fresh context does not have
const contextGlobals = new Set(vm.runInContext("Object.getOwnPropertyNames(globalThis)", context));
for (const name of Object.getOwnPropertyNames(globalThis)) {
  if (contextGlobals.has(name) || name in sandbox || name === "global") continue;
  Object.defineProperty(sandbox, name, Object.getOwnPropertyDescriptor(globalThis, name));
}
vm.runInContext("globalThis.global = globalThis", context);

/**
 * Lexes just enough JavaScript to find the top level of a cell: returns the cell with
 * comments blanked to spaces and strings, templates and regexes to NUL characters, and each
 * character's bracket depth (brackets count as inside).
 */
function scan(src) {
  const flat = src.split("");
  const depth = new Int32Array(src.length);
  const skipQuoted = (i, quote) => {
    for (i++; i < src.length && src[i] !== quote && src[i] !== "\n"; i++) {
      if (src[i] === "\\") i++;
    }
    return i + 1;
  };
  const skipTemplate = (i) => {
    for (i++; i < src.length; i++) {
      if (src[i] === "\\") i++;
      else if (src[i] === "`") return i + 1;
      else if (src[i] === "$" && src[i + 1] === "{") i = skipCode(i + 2, true) - 1;
    }
    return i;
  };
  const skipRegex = (i) => {
    let inClass = false;
    for (i++; i < src.length && src[i] !== "\n"; i++) {
      if (src[i] === "\\") i++;
      else if (src[i] === "[") inClass = true;
      else if (src[i] === "]") inClass = false;
      else if (src[i] === "/" && !inClass) break;
    }
    for (i++; i < src.length && /[a-z]/.test(src[i]); i++);
    return i;
  };
  const skipTo = (i, end) => {
    const at = src.indexOf(end, i);
    return at < 0 ? src.length + end.length : at + end.length;
  };
  // A "/" starts a regex unless it follows an operand (a name, literal or closing bracket).
  const operandEnd = /[\w$)\]}]$/;
  const keywords = "return|typeof|case|do|else|in|of|new|delete|void|throw|yield|await";
  const keywordEnd = new RegExp(`(^|[^\\w$.])(${keywords})$`);
  // Scans code from i; when `nested` (inside a template's "${"), returns after its "}".
  function skipCode(i, nested) {
    let d = 0;
    let prev = ""; // the last few non-blank characters
    while (i < src.length) {
      const c = src[i];
      const start = i;
      if (c === "/" && src[i + 1] === "/") i = skipTo(i, "\n") - 1;
      else if (c === "/" && src[i + 1] === "*") i = skipTo(i + 2, "*/");
      else if (c === "'" || c === '"') i = skipQuoted(i, c);
      else if (c === "`") i = skipTemplate(i);
      else if (c === "/" && (!operandEnd.test(prev) || keywordEnd.test(prev))) i = skipRegex(i);
      else {
        if ("([{".includes(c)) d++;
        else if (nested && d === 0 && c === "}") return i + 1;
        else if (")]}".includes(c)) d--;
        if (!nested) depth[i] = ")]}".includes(c) ? d + 1 : d;
        if (!/\s/.test(c)) prev = (prev + c).slice(-16);
        i++;
        continue;
      }
      i = Math.max(i, start + 1);
      const comment = c === "/" && (src[start + 1] === "/" || src[start + 1] === "*");
      if (!nested) {
        for (let k = start; k < i && k < src.length; k++) {
          flat[k] = comment ? " " : "\0";
          depth[k] = d;
        }
      }
      if (!comment) prev = (prev + "0").slice(-16); // a literal is an operand
    }
    return i;
  }
  skipCode(0, false);
  return [flat.join(""), depth];
}

const compiles = (source) => {
  try {
    new vm.Script(source);
    return true;
  } catch {
    return false;
  }
};
const asyncBody = (body) => `(async () => {\n${body}\n})()`;
const NAME = /^[A-Za-z_$][\w$]*/;

/** Names declared at the top level of a scanned cell (let/const/var, function, class). */
function declaredNames(flat, depth) {
  const names = new Set();
  const decl = /(?<![\w$.])(?:(let|const|var)|(?:async\s+)?function\s*\*?|class)\s*(?=[\w$[{])/g;
  for (let m; (m = decl.exec(flat)); ) {
    if (depth[m.index] !== 0) continue;
    const start = m.index + m[0].length;
    if (!m[1]) {
      const name = NAME.exec(flat.slice(start));
      if (name) names.add(name[0]);
      continue;
    }
    // declarators end at ";" or at a line end not after ","; split them at top-level commas
    const parts = [];
    let from = start;
    let i = start;
    for (; i < flat.length; i++) {
      if (depth[i] !== 0) continue;
      if (flat[i] === ";" || (flat[i] === "\n" && !/,\s*$/.test(flat.slice(start, i)))) break;
      if (flat[i] === ",") parts.push([from, i]), (from = i + 1);
    }
    parts.push([from, i]);
    for (let [a, b] of parts) {
      while (a < b && /\s/.test(flat[a])) a++;
      if (flat[a] !== "[" && flat[a] !== "{") {
        const name = NAME.exec(flat.slice(a, b));
        if (name) names.add(name[0]);
        continue;
      }
      let end = a;
      while (end < b && depth[end] > 0) end++;
      const pattern = flat.slice(a, end).replace(/=[^,}\]]*/g, "");
      for (const name of pattern.match(/[A-Za-z_$][\w$]*(?![\w$]*\s*:)/g) || []) names.add(name);
    }
  }
  return [...names].filter((n) => n !== "await" && n !== "yield" && compiles(`let ${n};`));
}

/** Rewrites a top-level-await cell as an async IIFE returning its value and declarations. */
function asyncWrapper(code) {
  const [flatAll, depth] = scan(code);
  let end = code.length;
  while (end > 0 && (/\s/.test(flatAll[end - 1]) || flatAll[end - 1] === ";")) end--;
  const src = code.slice(0, end);
  const flat = flatAll.slice(0, end);
  const names = declaredNames(flat, depth);
  const exports = names.map((n) => `try { __bulkheadV.${n} = ${n}; } catch {}`).join(" ");
  const vars = `(() => { const __bulkheadV = {}; ${exports} return __bulkheadV; })()`;
  const marker = (value) => `return { __bulkheadCell: true, value: ${value}, vars: ${vars} };`;
  // The value is the longest suffix that starts a statement and parses as an expression.
  const starts = [0];
  for (let i = 0; i < flat.length; i++) {
    if ((flat[i] === ";" || flat[i] === "\n") && depth[i] === 0) starts.push(i + 1);
  }
  const statement = new RegExp(
    "^({|(let|const|var|class|function|async\\s+function|if|for|while|do|try|switch|" +
      "return|throw|break|continue|import|export)\\b)",
  );
  let best = -1;
  for (let k = starts.length - 1; k >= 0; k--) {
    const head = flat.slice(starts[k]).trim();
    const ok =
      head !== "" &&
      !statement.test(head) &&
      compiles(asyncBody(`return (${src.slice(starts[k])}\n);`)) &&
      compiles(asyncBody(src.slice(0, starts[k])));
    if (ok) best = starts[k];
    else if (best >= 0) break;
  }
  const body =
    best >= 0
      ? `${src.slice(0, best)};${marker(`(${src.slice(best)}\n)`)}`
      : `${code}\n;${marker("undefined")}`;
  return asyncBody(body);
}

function compile(code, filename) {
  try {
    return [new vm.Script(code, { filename }), false];
  } catch (err) {
    if (!/\bawait\b/.test(code)) throw err;
    return [new vm.Script(asyncWrapper(code), { filename, lineOffset: -1 }), true];
  }
}

function describe(err) {
  const isError = err !== null && typeof err === "object" && typeof err.stack === "string";
  if (!isError) {
    return { name: "Error", value: String(err), traceback: ["Uncaught " + util.inspect(err)] };
  }
  const lines = [];
  for (const line of err.stack.split("\n")) {
    // the frames below the cell are the kernel's
    const kernelFrame = line.includes(__filename) || /\(?node:(vm|internal)/.test(line);
    if (/^\s+at /.test(line) && kernelFrame) break;
    if (line.trim()) lines.push(line);
  }
  return { name: String(err.name || "Error"), value: String(err.message ?? ""), traceback: lines };
}

let interrupt = null; // rejects the awaited cell on SIGINT
process.on("SIGINT", () => {
  const error = new Error("Execution interrupted by SIGINT");
  if (interrupt) interrupt(Object.assign(error, { name: "KeyboardInterrupt" }));
});
// a rejection or exception that no cell awaits is reported, not fatal
process.on("unhandledRejection", (reason) => {
  output("stderr", `Unhandled promise rejection: ${util.inspect(reason)}\n`);
});
process.on("uncaughtException", (err) => output("stderr", `Uncaught ${util.inspect(err)}\n`));

async function execute(id, code) {
  count += 1;
  cellId = id;
  for (const [stream, text] of pending) send({ type: stream, id, text });
  pending = [];
  try {
    const [script, isAsync] = compile(code, `<cell-${count}>`);
    let value = script.runInContext(context, { breakOnSigint: true });
    if (isAsync) {
      const stop = new Promise((_, reject) => (interrupt = reject));
      const keepAlive = setInterval(() => {}, 1 << 30); // a cell may await forever (until SIGINT)
      try {
        value = await Promise.race([value, stop]);
      } finally {
        clearInterval(keepAlive);
      }
      if (value && value.__bulkheadCell === true) {
        context.__bulkheadVars = value.vars;
        for (const name of Object.keys(value.vars)) {
          try {
            vm.runInContext(`${name} = globalThis.__bulkheadVars.${name}`, context);
          } catch {}
        }
        delete context.__bulkheadVars;
        value = value.value;
      }
    }
    if (value !== undefined) {
      const data = { "text/plain": util.inspect(value) };
      send({ type: "result", id, data, is_main_result: true });
    }
  } catch (err) {
    if (err && err.code === "ERR_SCRIPT_EXECUTION_INTERRUPTED") err.name = "KeyboardInterrupt";
    send({ type: "error", id, ...describe(err) });
  } finally {
    interrupt = null;
  }
  send({ type: "end", id, execution_count: count });
  cellId = null;
}

function invalid(id, message) {
  send({ type: "error", id, name: "ProtocolError", value: message, traceback: [] });
  send({ type: "end", id, execution_count: null });
}

async function serve() {
  send({ type: "ready", language: "javascript", version: process.versions.node });
  const lines = readline.createInterface({ input: process.stdin, crlfDelay: Infinity });
  for await (const line of lines) {
    let request;
    try {
      request = JSON.parse(line);
    } catch (err) {
      invalid(null, `invalid JSON: ${err.message}`);
      continue;
    }
    if (request === null || typeof request !== "object" || Array.isArray(request)) {
      invalid(null, "a request must be a JSON object");
      continue;
    }
    const id = typeof request.id === "string" ? request.id : null;
    const unknown = Object.keys(request).filter((k) => k !== "id" && k !== "code");
    if (id === null) invalid(null, '"id" must be a string');
    else if (typeof request.code !== "string") invalid(id, '"code" must be a string');
    else if (unknown.length) invalid(id, `unknown field(s): ${unknown.sort().join(", ")}`);
    else await execute(id, request.code);
  }
  const drained = new Promise((resolve) => {
    writer.on("message", (msg) => msg === "drained" && resolve());
  });
  writer.postMessage(null); // after every line queued before it
  await drained;
  process.exit(0);
}

serve();
