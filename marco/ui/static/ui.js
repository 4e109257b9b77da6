// marco ui: expand/collapse trees and open the node a shared link (#node-ID) points at. No dependencies.
(function () {
  'use strict';
  function openTo(li) {
    for (let el = li; el; el = el.parentElement) {
      if (el.tagName === 'DETAILS') el.open = true;
    }
  }
  function showTarget() {
    document.querySelectorAll('li.node.target').forEach(function (el) { el.classList.remove('target'); });
    const id = decodeURIComponent(location.hash.slice(1));
    if (!id.startsWith('node-')) return;
    const li = document.getElementById(id);
    if (!li) return;
    openTo(li);
    const own = li.querySelector(':scope > details');
    if (own) own.open = true;  // the linked node's own text too
    li.classList.add('target');
    li.scrollIntoView({block: 'center'});
  }
  document.addEventListener('click', function (ev) {
    const btn = ev.target.closest('button[data-tree-action]');
    if (!btn) return;
    const box = btn.closest('.treebox');
    const action = btn.dataset.treeAction;
    box.querySelectorAll('li.node > details').forEach(function (d) {
      const li = d.parentElement;
      d.open = action === 'expand' || (action === 'chosen' && (li.classList.contains('chosen') || !li.parentElement.closest('li.node')));
    });
  });
  window.addEventListener('hashchange', showTarget);
  showTarget();
})();
